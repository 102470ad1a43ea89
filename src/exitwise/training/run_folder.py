"""The run folder of :func:`exitwise.training.train`: what may be resumed, and from where.

A run folder holds one sub-folder per stage (the Trainer's checkpoints), ``final/`` and the
progress marker (:data:`exitwise.checkpoint.PROGRESS_NAME`): the strategy, the completed
stages and the run's settings. Resuming continues the run the folder holds, so it must be the
same run: the marker records the training arguments that change the result and what can be
told cheaply of the training data, and a resume with others is refused (else a finished
stage would be skipped and the new settings silently ignored). A checkpoint the Trainer was
still writing when the process died is passed over for the last complete one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import PROGRESS_NAME, read_progress
from ..errors import ConfigError
from .base import Stage, TrainingStrategy
from .collate import as_example

FINAL_DIR = "final"

# Training arguments that change how a run is logged, saved or fed, not what it computes.
NO_EFFECT_ARGS = frozenset({
    "disable_tqdm", "logging_strategy", "logging_steps", "logging_first_step", "logging_dir",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "report_to",
    "run_name", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "eval_strategy",
    "eval_steps", "per_device_eval_batch_size", "use_cpu",
})
DIGEST_ITEMS = 64  # items hashed, evenly spaced (a list's; see data_digest)


def data_digest(dataset: Any) -> str | None:
    """A short fingerprint of a training set, or None where none can be taken safely: its own
    ``fingerprint()`` (:class:`exitwise.data.TokenizedDataset`), a ``datasets.Dataset``'s
    fingerprint; for a list or tuple, a hash of up to
    :data:`DIGEST_ITEMS` evenly spaced items. Other datasets may build items afresh (random
    augmentation), so only their length is recorded."""
    own = getattr(dataset, "fingerprint", None)  # a dataset that can say (TokenizedDataset)
    if callable(own):
        return str(own())
    fingerprint = getattr(dataset, "_fingerprint", None)
    if isinstance(fingerprint, str):
        return fingerprint
    if not isinstance(dataset, (list, tuple)) or not dataset:
        return None
    h = hashlib.sha1()
    n = len(dataset)
    for i in sorted({int(j * (n - 1) / max(1, DIGEST_ITEMS - 1)) for j in range(DIGEST_ITEMS)}):
        for key, value in sorted(as_example(dataset[i]).items()):
            h.update(str(key).encode())
            if isinstance(value, torch.Tensor):
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()[:16]


def run_settings(training_args: dict[str, Any], dataset: Any) -> dict[str, Any]:
    """What a resume must find unchanged (JSON-able)."""
    args = {k: v for k, v in training_args.items() if k not in NO_EFFECT_ARGS}
    return {
        "training_args": json.loads(json.dumps(args, sort_keys=True, default=str)),
        "train_rows": len(dataset) if hasattr(dataset, "__len__") else None,
        "train_digest": data_digest(dataset),
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    old_args, new_args = old.get("training_args", {}), new.get("training_args", {})
    for key in sorted(set(old_args) | set(new_args)):
        if old_args.get(key) != new_args.get(key):
            out.append(f"{key}: {old_args.get(key)!r} -> {new_args.get(key)!r}")
    for key in ("train_rows", "train_digest"):
        if old.get(key) != new.get(key):
            out.append(f"{key.replace('_', ' ')}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def prepare_output_dir(
    out: Path, strategy: TrainingStrategy, stages: list[Stage], resume: bool,
    overwrite: bool, settings: dict[str, Any],
) -> list[str]:
    """Completed stage names (when resuming); clears or refuses a used folder otherwise."""
    description = strategy.describe()
    progress = read_progress(out)
    used = progress is not None or any((out / s.name).exists() for s in stages)
    if overwrite and used:
        for s in stages:
            shutil.rmtree(out / s.name, ignore_errors=True)
        shutil.rmtree(out / FINAL_DIR, ignore_errors=True)
        # the marker goes too: a rerun after an interrupted overwrite once found the old
        # run's "stage-1 completed" beside the deleted stage folder
        (out / PROGRESS_NAME).unlink(missing_ok=True)
        progress, used = None, False
    if not resume:
        if used:
            raise ConfigError(
                f"{out} already holds a training run; pass resume=True to continue it or "
                "overwrite=True to start over"
            )
        return []
    if progress is None:
        return []
    if progress.get("strategy") != description:
        raise ConfigError(
            f"{out} holds a run of strategy {progress.get('strategy')}, not {description}; "
            "resume with the same strategy or use another output_dir"
        )
    saved = progress.get("settings")
    changed = _differences(saved, settings) if saved is not None else []
    if changed:
        raise ConfigError(
            f"{out} holds a run with other settings ({'; '.join(changed)}); resuming would "
            "keep its results under the new settings. Use the same settings, overwrite=True "
            "to start over (exitwise train: --no-resume), or another output_dir")
    return list(progress.get("completed", []))


def last_complete_checkpoint(stage_dir: Path) -> str | None:
    """The newest ``checkpoint-N`` the Trainer finished writing (its ``trainer_state.json``
    is written last), or None. A process killed while writing one leaves it partial, and
    resuming from it failed on every rerun."""
    if not stage_dir.is_dir():
        return None
    found = []
    for d in stage_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir() and _complete_json(d / "trainer_state.json"):
            found.append((int(m.group(1)), d))
    return str(max(found)[1]) if found else None


def _complete_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut short while written
        return False
    return True
