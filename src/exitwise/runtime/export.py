"""ONNX export of a multi-exit network as *segments*, and an early-exit runner over them.

Segment k holds the blocks between exit k-1 and exit k plus exit k's head (segment 0 also the
stem). It takes the previous segment's features, ``(B, ...)``, and returns
``(features, logits)``: the activations after its last block, which the next segment reads,
and exit k's raw (untempered) logits ``(B, C)``. A head that reads the previous exit's logits
(``cascade``) gets them as a second input, ``previous_logits (B, C)``. The batch dimension is
dynamic, so a runner can hand the next segment only the rows that are still running.

:class:`OnnxExitRunner` chains the segments with onnxruntime and asks an exitwise policy at
every exit, exactly as :func:`exitwise.runtime.run_early_exit` does (temperatures applied
before the policy, rows that exit leave the batch, the last exit takes everyone), so its exit
decisions equal the eager executor's.

Written to a folder: ``segment_{k}.onnx`` per exit and ``segments.json`` (the manifest: exit
layers, temperatures, input shape, per-segment inputs and outputs).

Backbones: :class:`~exitwise.backbones.VisionBackbone` (feature maps and ViT tokens) and
:class:`~exitwise.backbones.SequentialBackbone`. Needs ``pip install exitwise[export]``
(onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..backbones.base import BackboneState
from ..backbones.sequential import SequentialBackbone
from ..backbones.vision import VisionBackbone, run_calls
from ..errors import InputError, UnsupportedModelError
from ..heads import uses_past_states, uses_previous_logits
from ..labels import validate_labels
from ..modes import eval_mode
from ..policies.base import ExitPolicy

if TYPE_CHECKING:  # pragma: no cover
    from ..model import MultiExitModel

MANIFEST = "segments.json"
FORMAT = "exitwise-onnx-segments"


def require(module: str) -> Any:
    """Import an optional export dependency or raise an ImportError that says how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs {module!r}, which is not installed: "
            "pip install 'exitwise[export]'  (onnx, onnxruntime, onnxscript)"
        ) from err


class ExitSegment(nn.Module):
    """Blocks ``first_block .. last_block - 1`` (0-based) and exit ``exit_index``'s head.

    forward(features (B, ...), [previous_logits (B, C)]) -> (features (B, ...), logits (B, C)).
    For segment 0 ``features`` is the input batch and the stem runs first.
    """

    def __init__(self, model: "MultiExitModel", exit_index: int, first_block: int,
                 last_block: int) -> None:
        super().__init__()
        self.model = model
        self.exit_index = exit_index
        self.first_block, self.last_block = first_block, last_block
        self.takes_previous = uses_previous_logits(model.heads[exit_index])

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        backbone = self.model.backbone
        if isinstance(backbone, VisionBackbone):
            # The stem calls of ``start`` without its Python-side input checks (the runner
            # checks the input shape against the manifest instead).
            return run_calls(backbone._stem, x)
        stem = backbone.stem
        return stem(x) if stem is not None else x

    def _state(self, hidden: torch.Tensor) -> BackboneState:
        backbone = self.model.backbone
        mask = None
        if isinstance(backbone, VisionBackbone) and backbone.layout.tokens and hidden.dim() == 3:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return BackboneState(hidden=hidden, mask=mask)

    def forward(self, features: torch.Tensor, previous_logits: torch.Tensor | None = None):
        hidden = self._stem(features) if self.exit_index == 0 else features
        state = self._state(hidden)
        for i in range(self.first_block, self.last_block):
            state = self.model.backbone.step(i, state)
        head_in, mask = self.model.backbone.features(state)
        logits = self.model.head_logits(self.exit_index, head_in, mask, previous_logits)
        return state.hidden, logits


def segments_of(model: "MultiExitModel") -> list[ExitSegment]:
    """One :class:`ExitSegment` per exit, shallowest first."""
    if not isinstance(model.backbone, (VisionBackbone, SequentialBackbone)):
        raise UnsupportedModelError(
            f"ONNX segment export supports vision and nn.Sequential backbones, not "
            f"{type(model.backbone).__name__}"
        )
    if model.gate is not None:
        raise UnsupportedModelError("ONNX segment export does not carry skip gates (the "
                                    f"{model.gate.registered_name!r} gate of this model)")
    past = [k for k, h in enumerate(model.heads) if uses_past_states(h)]
    if past:  # a segment hands on its state and logits only, not every earlier exit's state
        raise UnsupportedModelError(
            f"ONNX segment export does not carry the earlier exits' states that the "
            f"{type(model.heads[past[0]]).registered_name!r} heads read (exits {past})")
    segments, start = [], 0
    for k, depth in enumerate(model.exit_layers):
        segments.append(ExitSegment(model, k, start, depth))
        start = depth
    return segments


@contextlib.contextmanager
def _one_torchlib_registry() -> Iterator[None]:
    """Build torch.onnx's operator registry once for all segments instead of once per graph.

    ``torch.onnx.export`` rebuilds the registry from onnxscript's torchlib on every call (about
    two seconds each); segments share it. This reaches into a private module, so when that
    module is not what is expected nothing is patched and each export builds its own.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        owner = _registration.ONNXRegistry
        original = owner.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return
    built: dict[Any, Any] = {}

    def cached(cls: Any, *args: Any, **kwargs: Any) -> Any:
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build(cls, *args, **kwargs)
        return built[key]

    owner.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        owner.from_torchlib = original


def _export_one(segment: ExitSegment, args: tuple, path: Path, opset: int) -> None:
    """torch.export-based ONNX export (the default exporter of recent PyTorch; the legacy
    TorchScript tracer is deprecated, and gave wrong batch-dynamic graphs here)."""
    names = ["features"] + (["previous_logits"] if len(args) == 2 else [])
    outputs = ["next_features", "logits"]
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(segment, args, input_names=names, output_names=outputs,
                                    dynamic_shapes=shapes, opset_version=opset, dynamo=True,
                                    verbose=False)
    program.save(str(path))


def _export_all(segments: list[ExitSegment], example: torch.Tensor, out: Path,
                opset: int) -> list[dict[str, Any]]:
    """Export each segment, feeding it the eager outputs of the one before; manifest entries."""
    features: torch.Tensor = example
    previous: torch.Tensor | None = None
    entries = []
    for seg in segments:
        takes_previous = seg.takes_previous and seg.exit_index > 0
        args = (features, previous) if takes_previous else (features,)
        name = f"segment_{seg.exit_index}.onnx"
        _export_one(seg, args, out / name, opset)
        next_features, logits = seg(*args)
        entries.append({
            "exit_index": seg.exit_index,
            "blocks": [seg.first_block, seg.last_block],
            "file": name,
            "inputs": ["features"] + (["previous_logits"] if takes_previous else []),
            "feature_shape": list(features.shape[1:]),
        })
        features, previous = next_features, logits
    return entries


@torch.no_grad()
def export_segments(
    model: "MultiExitModel",
    out_dir: str | Path,
    example: torch.Tensor,
    opset: int = 18,
) -> Path:
    """Write one ONNX graph per exit segment plus ``segments.json`` into ``out_dir``.

    example: an input batch (B, ...) at the resolution to export (vision: (B, C, H, W)); the
        batch size stays dynamic, the other dimensions are fixed to the example's.
    Returns the manifest's path. The model is exported in eval mode and restored afterwards.
    """
    require("onnx")
    require("onnxscript")  # torch.onnx's torch.export-based exporter builds graphs with it
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise InputError("example must be an input batch tensor (B, ...)")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32} or (example.is_floating_point()
                                    and example.dtype != torch.float32):
        got = sorted(str(d).replace("torch.", "") for d in dtypes | {example.dtype})
        raise InputError(
            f"export runs in float32 (onnxruntime's CPU kernels lack the others); the model "
            f"and example are {', '.join(got)}: export model.float() with a float32 example")
    segments = segments_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):  # before anything runs: no BatchNorm statistics updates, no dropout
        # validates the input (channels, image size) eagerly
        model.backbone.start(pixel_values=example)
        with _one_torchlib_registry():
            entries = _export_all(segments, example, out, opset)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "exit_layers": list(model.exit_layers),
        "num_labels": int(model.num_labels),
        "temperatures": model.temperature_list(),
        "input_shape": list(example.shape[1:]),
        "input_dtype": str(example.dtype).replace("torch.", ""),
        "opset": opset,
        "segments": entries,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


@dataclass
class OnnxExitResult:
    """What :meth:`OnnxExitRunner.run` returns (the eager executor's fields, no FLOPs).

    logits: (B, C) what each row returned at its exit: the temperature-scaled logits, or the
        policy's output for policies that change it (ZTW's ensemble); exit_index, exit_layer: (B,).
    rows_per_segment: how many rows entered each segment.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    exit_layer: torch.Tensor
    rows_per_segment: list[int]
    task: str = "classification"

    @property
    def predictions(self) -> torch.Tensor:
        """(B,) the arg-max class, or the predicted value for regression."""
        return self.logits[:, 0] if self.task == "regression" else self.logits.argmax(-1)


class OnnxExitRunner:
    """Early exit over exported segments with onnxruntime.

    ``OnnxExitRunner(folder)`` loads ``segments.json`` and one InferenceSession per segment
    (CPU unless ``providers`` says otherwise). ``temperatures`` overrides the exported ones.
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None,
                 temperatures: list[float] | None = None) -> None:
        ort = require("onnxruntime")
        root = Path(folder)
        path = root / MANIFEST
        if not path.is_file():
            raise InputError(f"{path} not found: export the model with export_segments first")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise InputError(f"{path} is not an exitwise ONNX segment manifest")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.sessions = [
            ort.InferenceSession(str(root / seg["file"]), sess_options=options,
                                 providers=providers or ["CPUExecutionProvider"])
            for seg in self.manifest["segments"]
        ]
        temps = temperatures if temperatures is not None else self.manifest["temperatures"]
        if len(temps) != len(self.sessions):
            raise InputError(f"{len(temps)} temperatures for {len(self.sessions)} exits")
        self.temperatures = [float(t) for t in temps]
        self.exit_layers = list(self.manifest["exit_layers"])
        self.num_labels = int(self.manifest["num_labels"])
        # one output is a regression target (Hugging Face's num_labels == 1), as eagerly
        self.task = "regression" if self.num_labels == 1 else "classification"

    @property
    def num_exits(self) -> int:
        return len(self.sessions)

    def _check_input(self, x: Any) -> np.ndarray:
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        want = list(self.manifest["input_shape"])
        if arr.ndim != len(want) + 1 or list(arr.shape[1:]) != want:
            dims = ", ".join(map(str, want))
            raise InputError(f"the segments were exported for inputs (B, {dims}); got "
                             f"{tuple(arr.shape)}")
        if arr.shape[0] == 0:
            raise InputError("the batch is empty: give at least one row")
        return np.ascontiguousarray(arr.astype(self.manifest["input_dtype"], copy=False))

    def _segment(self, k: int, features: np.ndarray, previous: np.ndarray | None):
        feeds = {"features": features}
        if "previous_logits" in self.manifest["segments"][k]["inputs"]:
            feeds["previous_logits"] = previous
        next_features, logits = self.sessions[k].run(None, feeds)
        return next_features, logits

    def all_exits(self, x: Any) -> torch.Tensor:
        """(B, E, C) every exit's raw logits, no early exit (for checks against eager)."""
        features, previous, out = self._check_input(x), None, []
        for k in range(self.num_exits):
            features, previous = self._segment(k, features, previous)
            out.append(torch.from_numpy(previous.copy()))
        return torch.stack(out, dim=1)

    def run(self, x: Any, policy: ExitPolicy, labels: torch.Tensor | None = None) -> OnnxExitResult:
        """Early exit on one batch with ``policy``; same decisions as the eager executor."""
        policy.check_task(self.task)  # as the eager executor: no confidence on a value
        if policy.needs_labels and labels is None:
            raise InputError(f"policy {policy.registered_name!r} needs labels")
        if policy.uses_scores:
            raise InputError(f"policy {policy.registered_name!r} reads a learned exit score, "
                             "which the exported segments do not compute; run it eagerly")
        features = self._check_input(x)
        b, num_exits = features.shape[0], self.num_exits
        if labels is not None:
            labels = validate_labels(labels, self.num_labels, self.task, b)
        out_logits: torch.Tensor | None = None
        exit_index = torch.full((b,), -1, dtype=torch.long)
        active = torch.arange(b)
        pstate = policy.init_state(b, "cpu")
        previous: np.ndarray | None = None
        rows: list[int] = []
        for k in range(num_exits):
            rows.append(int(active.numel()))
            features, raw = self._segment(k, features, previous)
            previous = raw
            logits = torch.from_numpy(raw.copy())
            if self.temperatures[k] != 1.0:
                logits = logits / self.temperatures[k]
            policy.check_logits(logits)
            if out_logits is None:
                out_logits = torch.empty(b, logits.shape[-1], dtype=logits.dtype)
            emitted = (policy.output_logits(k, num_exits, logits, pstate)
                       if policy.transforms_output else logits)  # as the eager executor
            if k == num_exits - 1:
                done = torch.ones(logits.shape[0], dtype=torch.bool)
            else:
                done, pstate = policy.decide(k, num_exits, logits, pstate, labels)
            leave = done.nonzero().squeeze(1)
            out_logits[active[leave]] = emitted[leave].to(out_logits.dtype)
            exit_index[active[leave]] = k
            if int(leave.numel()) == int(active.numel()):
                break
            if leave.numel():
                stay = (~done).nonzero().squeeze(1)
                active = active[stay]
                keep = stay.numpy()
                features, previous = features[keep], previous[keep]
                pstate = policy.keep(pstate, stay)
                if labels is not None:
                    labels = labels[stay]
        assert out_logits is not None
        layers = torch.tensor(self.exit_layers, dtype=torch.long)[exit_index]
        return OnnxExitResult(out_logits, exit_index, layers, rows, self.task)
