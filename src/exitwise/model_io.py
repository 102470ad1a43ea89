"""Saving and loading a multi-exit model folder, without pickle.

A folder holds ``exit_config.json`` (the exit configuration, the backbone's description and a
fingerprint of its weights, the calibration; written last, so it marks a complete save),
``exit_heads.safetensors`` (heads, temperatures, ensemble, scorer, gate) and, when the backbone
was fine-tuned, the backbone: the Hugging Face model's own ``save_pretrained`` output in
``backbone/`` or, for other networks, ``backbone.safetensors``. :class:`MultiExitModel`'s
``save_pretrained`` / ``save_calibration`` / ``from_pretrained`` are these functions.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from .backbones import Backbone, wrap_backbone
from .checkpoint import (
    load_saved_hf_weights,
    same_weights,
    weights_fingerprint,
    write_json_atomic,
)
from .config import ExitConfig
from .errors import CheckpointError

CONFIG_NAME = "exit_config.json"
HEADS_NAME = "exit_heads.safetensors"
BACKBONE_DIR = "backbone"
BACKBONE_WEIGHTS = "backbone.safetensors"
FORMAT_VERSION = 1


def model_meta(model: Any, backbone_saved: bool) -> dict[str, Any]:
    """What exit_config.json holds for ``model`` (a MultiExitModel)."""
    return {
        "format_version": FORMAT_VERSION,
        "exit_config": model.config.to_dict(),
        "exit_layers": model.exit_layers,
        "head_classes": [type(h).registered_name for h in model.heads],
        "backbone": model.backbone.describe(),
        "backbone_saved": backbone_saved,
        # which weights the heads were trained on: a backbone given at load time with
        # other weights (another checkpoint of the same architecture) is flagged
        "backbone_weights": weights_fingerprint(model.backbone),
        "calibration": model.calibration,
        "ensemble": None if model.ensemble is None else {"kind": "geometric"},
        "scorer": None if model.scorer is None else {
            "name": model.scorer.registered_name, "options": model.scorer.options},
        "gate": None if model.gate is None else {
            "name": model.gate.registered_name, "options": model.gate.options},
    }


def save_model(model: Any, save_dir: str | Path, save_backbone: bool | None = None) -> Path:
    """Write exit_config.json + exit_heads.safetensors (+ the backbone if tuned).

    save_backbone: None (default) = only when a recipe tuned it. A frozen backbone that no
    name or path can bring back (an ``nn.Sequential``, a timm/torchvision model, a model
    built in memory) must then be passed to :meth:`from_pretrained`, or saved with
    ``save_backbone=True``.
    """
    out = Path(save_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_backbone = model.backbone_tuned if save_backbone is None else save_backbone
    write_heads(model, out)
    if save_backbone:
        # A task model (BertForSequenceClassification ...) is saved whole, so that its
        # classifier comes back with it as the native final exit.
        hf_model = getattr(model.backbone, "task_model", None) or getattr(
            model.backbone, "model", None)
        if hasattr(hf_model, "save_pretrained"):
            hf_model.save_pretrained(str(out / BACKBONE_DIR))
        else:
            state = {
                k: v.detach().contiguous().cpu() for k, v in model.backbone.state_dict().items()
            }
            save_file(state, str(out / BACKBONE_WEIGHTS))
    write_json_atomic(out / CONFIG_NAME, model_meta(model, bool(save_backbone)))  # last: "done"
    return out


def save_calibration(model: Any, save_dir: str | Path) -> Path:
    """Rewrite what calibration changes in a saved model folder, the heads file (the
    temperatures live there) and exit_config.json, each under a temporary name and then
    renamed; the saved backbone is left as it is (rewriting it in place could tear it)."""
    out = Path(save_dir)
    cfg = out / CONFIG_NAME
    if not cfg.is_file():
        raise CheckpointError(f"{cfg} not found: save the model first (save_pretrained)")
    backbone_saved = bool(json.loads(cfg.read_text()).get("backbone_saved"))
    write_heads(model, out)
    write_json_atomic(cfg, model_meta(model, backbone_saved))
    return out


def write_heads(model: Any, out: Path) -> None:
    """exit_heads.safetensors: heads, temperatures, ensemble, scorer, gate (atomically)."""
    tensors = {
        f"heads.{k}": v.detach().contiguous().cpu() for k, v in model.heads.state_dict().items()
    }
    tensors["temperatures"] = model.temperatures.detach().cpu().contiguous()
    for name, part in (("ensemble", model.ensemble), ("scorer", model.scorer),
                       ("gate", model.gate)):
        if part is not None:
            tensors.update({f"{name}.{k}": v.detach().contiguous().cpu()
                            for k, v in part.state_dict().items()})
    tmp = out / (HEADS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "exitwise"})
    os.replace(tmp, out / HEADS_NAME)


def load_model(
    cls: Any,
    load_dir: str | Path,
    backbone: nn.Module | Backbone | None = None,
    **backbone_kwargs: Any,
) -> Any:
    """Load exit heads (and the backbone: the saved copy, the one given, or the original
    name/hub id recorded at save time) into a new ``cls`` (MultiExitModel or a subclass).
    Fails clearly if the shapes do not fit; warns when the backbone's weights are not the
    ones the heads were saved with."""
    src = Path(load_dir)
    given = backbone is not None
    cfg_path = src / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found: not an exitwise model directory")
    meta = json.loads(cfg_path.read_text())
    saved = meta["backbone"]
    if backbone is None:
        family = saved.get("family")
        if family not in ("hf-encoder", "hf-decoder"):
            raise CheckpointError(f"this model's backbone is a {family!r}; pass backbone=...")
        from transformers import (
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
        )

        loader = AutoModelForCausalLM if family == "hf-decoder" else AutoModel
        if saved.get("task_architecture"):  # the classifier is the native final exit
            loader = AutoModelForSequenceClassification

        where = str(src / BACKBONE_DIR) if meta.get("backbone_saved") else saved["name_or_path"]
        if not where:
            raise CheckpointError(
                "no saved backbone and no backbone name recorded; pass backbone=...")
        backbone = loader.from_pretrained(where, **backbone_kwargs)
    adapter = wrap_backbone(backbone)
    if meta.get("backbone_saved") and given:  # the fine-tuned weights, into the one given
        hf_model = getattr(adapter, "task_model", None) or getattr(adapter, "model", None)
        if (src / BACKBONE_DIR).is_dir() and isinstance(hf_model, nn.Module):
            load_saved_hf_weights(hf_model, src / BACKBONE_DIR)
        elif (src / BACKBONE_WEIGHTS).is_file():
            adapter.load_state_dict(load_file(str(src / BACKBONE_WEIGHTS)))
        else:
            raise CheckpointError(f"{src} records a fine-tuned backbone but holds no "
                                  f"{BACKBONE_DIR}/ or {BACKBONE_WEIGHTS}")
    have = adapter.describe()
    for key in ("family", "model_type", "num_layers", "hidden_size", "in_channels"):
        if key in saved and saved[key] != have.get(key):
            raise CheckpointError(
                f"these exit heads were saved for a backbone with {key}={saved[key]!r}, "
                f"but the backbone given has {key}={have.get(key)!r}"
            )
    model = cls(adapter, ExitConfig.from_dict(meta["exit_config"]))
    if model.exit_layers != meta["exit_layers"]:
        raise CheckpointError(
            f"exit layers {meta['exit_layers']} do not fit this backbone ({model.exit_layers})"
        )
    tensors = load_file(str(src / HEADS_NAME))
    head_state = {k[len("heads."):]: v for k, v in tensors.items() if k.startswith("heads.")}
    try:
        model.heads.load_state_dict(head_state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"saved exit heads do not fit this model: {err}") from None
    model.temperatures.copy_(tensors["temperatures"])
    attach = {  # the optional parts, each built as saved, then filled
        "ensemble": ("exit ensemble", lambda: model.attach_ensemble()),
        "scorer": ("exit scorer", lambda: model.attach_scorer(
            meta["scorer"]["name"], **meta["scorer"]["options"])),
        "gate": ("skip gate", lambda: model.attach_gate(
            meta["gate"]["name"], **meta["gate"]["options"])),
    }
    for part, (what, build) in attach.items():
        if not meta.get(part):
            continue
        found = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
        try:
            build().load_state_dict(found, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"saved {what} does not fit this model: {err}") from None
    recorded = meta.get("backbone_weights")
    if recorded is not None and not same_weights(recorded, weights_fingerprint(adapter)):
        warnings.warn(
            f"the backbone's weights are not the ones the exit heads in {src} were saved "
            "with (another checkpoint of the same architecture?): the heads read other "
            "features, so their outputs and any calibration do not hold", stacklevel=2)
    model.calibration = meta.get("calibration", {})
    model.backbone_tuned = bool(meta.get("backbone_saved"))
    # Like transformers' from_pretrained: ready for inference (no dropout in the heads).
    return model.eval()


def remove_model_files(out: Path, reports: tuple[str, ...] = ()) -> None:
    """Delete the model saved in ``out`` (and the ``reports`` files beside it), so that
    commands reading the folder refuse it until a new model is saved (a run started over
    must not leave the old model under the new run's settings)."""
    for name in (CONFIG_NAME, HEADS_NAME, BACKBONE_WEIGHTS, *reports):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / BACKBONE_DIR, ignore_errors=True)
