"""Weights and progress files of a training run, all without pickle.

The multi-exit model holds some modules under two names (the adapter keeps ``embeddings`` and
``blocks`` next to the wrapped HF model), so its ``state_dict`` has aliased tensors, which
safetensors refuses. :func:`unique_state_dict` keeps one name per tensor and
:func:`load_unique_state_dict` loads such a file back strictly, alias-aware.

A run folder looks like::

    output_dir/
      exitwise_progress.json     strategy + completed stages (the resume marker)
      stage-1/checkpoint-N/      Trainer checkpoints (model.safetensors, optimizer, rng ...)
      stage-1/model.safetensors  weights at the end of the stage
      stage-2/...
      final/                     MultiExitModel.save_pretrained output
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

PROGRESS_NAME = "exitwise_progress.json"
STAGE_WEIGHTS = "model.safetensors"


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def alias_groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names grouped by the tensor they point to, in state-dict order."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(_storage_key(t), []).append(name)
    return list(groups.values())


def unique_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``state`` (default: the model's) with one entry per distinct tensor, contiguous, on CPU."""
    state = model.state_dict() if state is None else state
    return {g[0]: state[g[0]].detach().contiguous().cpu() for g in alias_groups(state)}


def save_model_weights(
    model: nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        unique_state_dict(model, state), str(path), metadata={"format": "pt", "writer": "exitwise"}
    )
    return path


def load_unique_state_dict(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str = ""
) -> None:
    """Load ``tensors`` (one name per aliased tensor) into ``model``; every tensor of the
    model must be covered by exactly one of its names, and nothing else may be there."""
    own = model.state_dict()
    known = set(own)
    unexpected = sorted(set(tensors) - known)
    missing = [g for g in alias_groups(own) if not any(n in tensors for n in g)]
    if unexpected or missing:
        raise CheckpointError(
            f"weights in {source or 'the checkpoint'} do not fit this model: "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"missing {[g[0] for g in missing][:5]}{'...' if len(missing) > 5 else ''}"
        )
    for name, value in tensors.items():
        if own[name].shape != value.shape:
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(value.shape)}, "
                f"the model has {tuple(own[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def load_model_weights(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    load_unique_state_dict(model, load_file(str(path), device="cpu"), str(path))


# -- optimizer and random state, without pickle ---------------------------------------------
def optimizer_state(
    optimizer: torch.optim.Optimizer, device: torch.device | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors for a safetensors file, JSON-able rest) of an optimizer's state plus the CPU
    (and, on CUDA, the device's) random state: what an exact resume needs, with no pickle.
    Tensors are named ``state.<param id>.<key>`` and ``rng.cpu`` / ``rng.cuda``."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any],
    device: torch.device | None = None,
) -> None:
    """Inverse of :func:`optimizer_state`: loads the optimizer and restores the random state."""
    entries: dict[int, dict[str, Any]] = {int(p): dict(v) for p, v in rest["scalars"].items()}
    for name, t in tensors.items():
        if name.startswith("state."):
            _, pid, key = name.split(".", 2)
            entries.setdefault(int(pid), {})[key] = t
    optimizer.load_state_dict({"state": entries, "param_groups": rest["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


# -- the resume marker ---------------------------------------------------------------------
def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON state file, None when absent; a clear error when it is corrupt."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); delete it to start over"
        ) from None


def write_json_atomic(path: str | Path, data: dict[str, Any], indent: int | None = 2) -> None:
    """Atomically (write + rename) so an interruption never leaves half a file; a state file
    written last this way marks a complete checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    os.replace(tmp, path)


def read_progress(output_dir: str | Path) -> dict[str, Any] | None:
    return read_json(Path(output_dir) / PROGRESS_NAME)


def write_progress(output_dir: str | Path, progress: dict[str, Any]) -> None:
    write_json_atomic(Path(output_dir) / PROGRESS_NAME, progress)


def load_saved_hf_weights(module: nn.Module, folder: Path) -> None:
    """Load the weights ``save_pretrained`` wrote to ``folder`` into ``module`` (the same
    architecture, built elsewhere: a user's own instance given to ``from_pretrained``).

    Keys must match: a weight of the file that the module lacks, or a weight of the module
    that the file lacks, is a CheckpointError. Tied weights (an LM head sharing the
    embeddings), which ``save_pretrained`` writes once, are the only absences allowed.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = sorted(k for k in set(own) - set(state) if own[k].data_ptr() not in loaded)
    if unexpected or missing:
        raise CheckpointError(
            f"the backbone given does not fit the fine-tuned one saved in {folder}: "
            f"{len(missing)} weights missing from the file (e.g. {missing[:3]}), "
            f"{len(unexpected)} weights the model lacks (e.g. {unexpected[:3]}); "
            "load without backbone= to use the saved copy"
        )
    bad = [k for k in state if own[k].shape != state[k].shape]
    if bad:
        raise CheckpointError(f"the backbone given does not fit the fine-tuned one saved in "
                              f"{folder}: shapes differ at {bad[:3]}")
    module.load_state_dict(state, strict=False)


def parameter_samples(module: nn.Module, per_param: int = 4096) -> Iterator[torch.Tensor]:
    """Per parameter of ``module``, in order: a strided sample of about ``per_param`` of its
    values (flattened, detached; every value of a smaller one) — what the cheap weight
    summaries below and the shipped drafters' hashes read."""
    for p in module.parameters():
        flat = p.detach().reshape(-1)
        yield flat[:: max(1, flat.numel() // per_param)]


def weights_fingerprint(module: nn.Module, per_param: int = 4096) -> list[float]:
    """[weighted sum, weighted absolute sum] of :func:`parameter_samples`, in float64: cheap,
    and equal for the same weights in any precision up to rounding (compare with
    :func:`same_weights`)."""
    sums = [(s.double().sum(), s.double().abs().sum())
            for s in parameter_samples(module, per_param)]
    if not sums:
        return [0.0, 0.0]
    # one read-back per device (a GPU waits once, not once per parameter), then accumulated
    # in parameter order as always (the figures recorded in saved folders and cache keys
    # stay bit for bit the same)
    on: dict[torch.device, list[int]] = {}
    for n, (a, _) in enumerate(sums):
        on.setdefault(a.device, []).append(n)
    values: list[list[float]] = [[]] * len(sums)
    for order in on.values():
        for n, pair in zip(order, torch.stack([torch.stack(sums[n]) for n in order]).tolist()):
            values[n] = pair
    total, scale = 0.0, 0.0
    for n, (a, b) in enumerate(values):
        total += (n + 1) * a
        scale += (n + 1) * b
    return [total, scale]


def same_weights(a: list[float], b: list[float], rtol: float = 1e-3) -> bool:
    """Two :func:`weights_fingerprint` values of the same weights (a bf16 copy included)."""
    return abs(a[0] - b[0]) <= rtol * max(abs(a[1]), abs(b[1]), 1e-12)
