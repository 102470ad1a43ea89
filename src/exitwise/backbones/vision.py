"""Adapter for vision networks (timm ResNet / ViT / ConvNeXt, torchvision ResNet / MobileNet,
Hugging Face ViT), driven by :mod:`vision_layouts`.

The adapter calls the model's own stem, block and neck modules one at a time; it copies no
``forward``. Exits after an inner block read its raw output: a (B, C, H, W) feature map for
CNNs, a (B, T, H) token sequence for ViTs (with an all-ones (B, T) mask, so token heads know
the sequence length). The last block is followed by the model's own final norm and pooling
(the "neck"), so the final exit reads exactly the model's pre-logits features (B, D), i.e. the
output of :meth:`VisionBackbone.reference`.

FLOPs per block depend on the image size: they are measured once per input resolution with
``torch.utils.flop_counter`` on a one-image example and cached. That same one-image trial run
is how an image size a CNN cannot take is found before the real batch runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, UnsupportedModelError
from ..modes import eval_mode
from .base import Backbone, BackboneState, OwnClassifier, hf_label_names, resolve_path
from .flop_count import FlopCount
from .vision_layouts import VisionLayout, find_vision_layout, supported_vision_models

Size = tuple[int, int]


def run_calls(calls: list[Callable], x: torch.Tensor) -> torch.Tensor:
    """Apply ``calls`` in order; a tuple result keeps its first element (HF layers may return
    (hidden, attentions))."""
    for call in calls:
        x = call(x)
        if isinstance(x, tuple):  # HF layers may return (hidden, attentions)
            x = x[0]
    return x


@dataclass
class _Profile:
    """What one image of a given size costs and produces (FLOPs are per row)."""

    stem_flops: float
    block_flops: list[float]  # the last entry includes the neck
    widths: list[int]  # features' width after each block (last = pre-logits width)
    # positions a head reads after each block: H x W of a feature map, T of a token sequence,
    # 1 for a vector (the pre-logits after the last block)
    positions: list[int]


class VisionBackbone(Backbone):
    """A vision model as a stack of blocks.

    Inputs: ``start(pixel_values=x)`` with x (B, C, H, W) float (Hugging Face's name, the one
    keyword every vision entry point takes: ``model(pixel_values=x)``,
    ``model.early_exit(policy, pixel_values=x)``, data batches).
    image_size: (H, W) or an int, the resolution profiled at build time (feature widths,
        default example for FLOPs placement); default: the model's own input size
        (timm ``pretrained_cfg``, ViT ``img_size``, HF ``config.image_size``, else 224).
    example: alternatively an example batch (B, C, H, W) whose size is used.
    """

    family = "vision"

    def __init__(
        self,
        model: nn.Module,
        image_size: int | Size | None = None,
        example: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        found = find_vision_layout(model)
        if found is None:
            raise UnsupportedModelError(
                f"no vision layout for {type(model).__module__}.{type(model).__qualname__}; "
                f"supported: {', '.join(supported_vision_models())}. Add a row to "
                "exitwise.backbones.vision_layouts.VISION_LAYOUTS, or wrap the model's blocks "
                "in an nn.Sequential (SequentialBackbone)."
            )
        self.layout_key, self.layout = found
        layout: VisionLayout = self.layout
        # The task model, when the one given is a wrapper around the network we step through
        # (ViTForImageClassification): its classifier becomes the native final exit. In a
        # list, so that nn.Module does not register it a second time.
        self._task: list[nn.Module] = []
        if layout.reference == "hf-cls":  # the bare ViTModel inside ViTForImageClassification
            base = getattr(model, "base_model", model)
            if isinstance(base, nn.Module) and base is not model:
                self._task = [model]
                model = base
        # ``net``, not ``model``: MultiExitModel saves a tuned ``backbone.model`` with HF's
        # save_pretrained; every vision backbone is saved as one safetensors state dict instead,
        # which from_pretrained(backbone=...) loads back into the adapter.
        self.net = model
        self._stem = [self._require(p) for p in layout.stem]
        self._units = self._block_units()
        self._neck = [self._require(p) for p in layout.neck]
        if not self._units:
            where = layout.stage_list or ", ".join(layout.stages)
            raise UnsupportedModelError(f"{type(model).__name__} has no blocks in {where}")
        self.num_layers = len(self._units)
        # In a list, not an attribute: an attribute would register the conv a second time.
        self._conv = [self._find_first_conv()]
        self.in_channels = self._conv[0].in_channels
        self._profiles: dict[Size, _Profile] = {}
        self._last_size: Size | None = None
        if example is not None:
            image_size = (int(example.shape[-2]), int(example.shape[-1]))
        self.default_size: Size = self._as_size(image_size) if image_size else self._own_size()
        self.check_size(self.default_size)
        self._profile(self.default_size)

    # -- building from the table ------------------------------------------------------------
    def _require(self, path: str) -> Any:
        obj = resolve_path(self.net, path)
        if obj is None:
            raise UnsupportedModelError(
                f"{type(self.net).__name__} has no {path!r}, which the {self.layout.family} "
                "layout expects (a different version of the library?)"
            )
        return obj

    def _block_units(self) -> list[list[Callable]]:
        """Each block as the list of calls it makes (ConvNeXt: [downsample, block])."""
        layout = self.layout
        if layout.stage_list is not None:
            stages = list(self._require(layout.stage_list).children())
        else:
            stages = [self._require(p) for p in layout.stages]
        units: list[list[Callable]] = []
        for s, stage in enumerate(stages):
            pre = resolve_path(stage, layout.stage_pre) if layout.stage_pre else None
            inner = resolve_path(stage, layout.stage_blocks) if layout.stage_blocks else stage
            blocks = list(inner.children())[layout.skip if s == 0 else 0 :]
            for j, block in enumerate(blocks):
                units.append([pre, block] if (j == 0 and pre is not None) else [block])
        return units

    def _find_first_conv(self) -> nn.Conv2d:
        for part in self._stem:
            if isinstance(part, nn.Module):
                for m in part.modules():
                    if isinstance(m, nn.Conv2d):
                        return m
        raise UnsupportedModelError(
            f"no convolution found in the stem of {type(self.net).__name__}"
        )

    @staticmethod
    def _as_size(size: int | Size) -> Size:
        if isinstance(size, int):
            return (size, size)
        return (int(size[0]), int(size[1]))

    def _own_size(self) -> Size:
        if self.layout.size_rule == "timm-patch" and self.net.patch_embed.img_size is not None:
            return self._as_size(tuple(self.net.patch_embed.img_size))
        if self.layout.size_rule == "hf-fixed":
            return self._as_size(self.net.config.image_size)
        cfg = getattr(self.net, "pretrained_cfg", None) or {}
        shape = cfg.get("input_size") if isinstance(cfg, dict) else None
        return self._as_size(tuple(shape[-2:])) if shape else (224, 224)

    # -- input checks -----------------------------------------------------------------------
    def check_size(self, size: Size) -> None:
        """Raise InputError if the model cannot take (H, W) images (known rules only)."""
        h, w = size
        rule = self.layout.size_rule
        if rule == "hf-fixed":
            want = self._as_size(self.net.config.image_size)
            if (h, w) != want:
                raise InputError(
                    f"this ViT takes {want[0]}x{want[1]} images (config.image_size); got {h}x{w}: "
                    "resize the images"
                )
        elif rule == "timm-patch":
            pe = self.net.patch_embed
            want = None if pe.img_size is None else self._as_size(tuple(pe.img_size))
            ph, pw = self._as_size(tuple(pe.patch_size))
            if want is not None and getattr(pe, "strict_img_size", True) and (h, w) != want:
                raise InputError(
                    f"this ViT takes {want[0]}x{want[1]} images only; got {h}x{w}: resize the "
                    "images, or build the model with dynamic_img_size=True"
                )
            if not getattr(pe, "dynamic_img_pad", False) and (h % ph or w % pw):
                raise InputError(
                    f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}"
                )
            if not getattr(self.net, "dynamic_img_size", False) and want is not None:
                if (h // ph, w // pw) != (want[0] // ph, want[1] // pw):
                    raise InputError(
                        f"this ViT's position embeddings fit {want[0]}x{want[1]} images; got "
                        f"{h}x{w}: build the model with dynamic_img_size=True to take others"
                    )

    def images(self, pixel_values: Any = None, **extra: Any) -> torch.Tensor:
        """Validate and return the image batch (B, C, H, W), cast to the model's dtype."""
        if extra:
            raise InputError(
                f"unexpected inputs {sorted(extra)} for a vision model: give the images as "
                "pixel_values=<tensor (B, C, H, W)>"
            )
        images = pixel_values
        if not isinstance(images, torch.Tensor):
            raise InputError("give the images as pixel_values=<tensor (B, C, H, W)>")
        if images.dim() != 4:
            raise InputError(
                f"images must be (batch, channels, height, width); got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise InputError(f"images must be float (normalized pixels); got dtype {images.dtype}")
        self.check_batch(int(images.shape[0]))
        if images.shape[1] != self.in_channels:
            raise InputError(
                f"images have {images.shape[1]} channels but the model takes {self.in_channels}: "
                "convert them (e.g. grayscale -> RGB by repeating the channel) or build the "
                "model with the right number of input channels"
            )
        size = (int(images.shape[2]), int(images.shape[3]))
        self.check_size(size)
        if size not in self._profiles:
            self._profile(size, images)  # a one-image trial run: fails here, not mid-batch
        weight = self._conv[0].weight
        return images.to(weight.dtype) if images.dtype != weight.dtype else images

    # -- profiling --------------------------------------------------------------------------
    @torch.no_grad()
    def _profile(self, size: Size, like: torch.Tensor | None = None) -> _Profile:
        """Run one blank image of ``size`` through, recording FLOPs and widths per block."""
        weight = self._conv[0].weight
        device = like.device if like is not None else weight.device
        x = torch.zeros(1, self.in_channels, *size, dtype=weight.dtype, device=device)
        try:  # eval mode: no BatchNorm statistics updates, no dropout
            with eval_mode(self.net):
                return self._measure(size, x)
        except (RuntimeError, ValueError, AssertionError, IndexError) as err:
            raise InputError(
                f"{type(self.net).__name__} cannot take {size[0]}x{size[1]} images "
                f"({type(err).__name__} on a blank image: {err})"
            ) from None

    def _measure(self, size: Size, x: torch.Tensor) -> _Profile:
        """One blank image through the stem and each block, counting FLOPs."""
        with FlopCount() as counter:
            x = run_calls(self._stem, x)
        stem, flops, widths, positions = float(counter.total), [], [], []
        for i, unit in enumerate(self._units):
            with FlopCount() as counter:
                x = run_calls(unit, x)
                if i == self.num_layers - 1:
                    x = self._neck_forward(x)
            flops.append(float(counter.total))
            tokens = self.layout.tokens and x.dim() == 3  # (B, T, H); else (B, C, ...)
            widths.append(int(x.shape[-1] if tokens else x.shape[1]))
            positions.append(int(x.shape[1]) if tokens else max(1, int(x[0, 0].numel())))
        profile = _Profile(stem, flops, widths, positions)
        self._profiles[size] = profile
        return profile

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A blank batch (batch_size, C, H, W) at the profiled default size."""
        weight = self._conv[0].weight
        return torch.zeros(batch_size, self.in_channels, *self.default_size,
                           dtype=weight.dtype, device=weight.device)

    # -- the contract -----------------------------------------------------------------------
    def _neck_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own final norm + pooling: (B, C, H, W) or (B, T, H) -> (B, D)."""
        x = run_calls(self._neck, x)
        pool = self.layout.pool
        if pool == "timm":
            return self.net.forward_head(x, pre_logits=True)
        if pool == "flatten":
            return torch.flatten(x, 1)
        if pool == "avg":
            return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        if pool == "cls":
            return x[:, 0]
        raise UnsupportedModelError(f"unknown pool kind {pool!r} in the vision layout")

    def start(self, pixel_values: Any = None, **inputs: Any) -> BackboneState:
        images = self.images(pixel_values, **inputs)
        size = (int(images.shape[2]), int(images.shape[3]))
        hidden = run_calls(self._stem, images)
        mask = None
        if self.layout.tokens:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        self._last_size = size
        return BackboneState(hidden=hidden, mask=mask, shared={"image_size": size})

    def step(self, i: int, state: BackboneState) -> BackboneState:
        state.hidden = run_calls(self._units[i], state.hidden)
        if i == self.num_layers - 1:
            state.hidden = self._neck_forward(state.hidden)
            state.mask = None  # pre-logits (B, D): no tokens any more
        return state

    def keep(self, state: BackboneState, rows: torch.Tensor) -> BackboneState:
        new = super().keep(state, rows)
        new.shared.update(state.shared)  # the image size does not depend on the rows
        return new

    def feature_dim(self, layer: int) -> int:
        return self._profiles[self.default_size].widths[layer - 1]

    def own_classifier(self) -> OwnClassifier | None:
        """The model's own classifier over the pre-logits features the final exit reads
        (timm ``get_classifier()``, torchvision ``fc`` / ``classifier``, HF
        ``ViTForImageClassification.classifier``); None for a headless model."""
        kind = self.layout.reference
        if kind == "timm":
            module = self.net.get_classifier() if hasattr(self.net, "get_classifier") else None
        elif kind == "hf-cls":
            module = getattr(self._task[0], "classifier", None) if self._task else None
        elif kind.startswith("hook:"):
            module = resolve_path(self.net, kind[5:])
        else:  # pragma: no cover - table error
            module = None
        if isinstance(module, tuple):  # timm's distilled models: (head, head_dist)
            if any(isinstance(m, nn.Linear) for part in module for m in part.modules()):
                raise UnsupportedModelError(
                    f"{type(self.net).__name__} classifies with two heads on two tokens (class "
                    "and distillation) and averages them; exitwise keeps one own classifier "
                    "over the pre-logits features, which cannot reproduce that. Remove them "
                    "with net.reset_classifier(0) and give the final exit's head and "
                    "num_labels, or use the model without distillation")
            return None  # reset: no classifier of its own
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)] if isinstance(
            module, nn.Module) else []
        if not linears:  # nn.Identity (num_classes=0) or nothing: no classifier of its own
            return None
        n = int(linears[-1].out_features)
        config = getattr(self._task[0], "config", None) if self._task else None
        names = hf_label_names(config, n) if config is not None else None
        return OwnClassifier("features", {"classifier": module}, n, names)

    @torch.no_grad()
    def reference(self, pixel_values: Any = None, **inputs: Any):
        """The model's own feature forward: (pre-logits (B, D), None)."""
        images = self.images(pixel_values, **inputs)
        kind = self.layout.reference
        if kind == "timm":
            out = self.net.forward_head(self.net.forward_features(images), pre_logits=True)
        elif kind == "hf-cls":
            out = self.net(pixel_values=images).last_hidden_state[:, 0]
        elif kind.startswith("hook:"):
            seen: list[torch.Tensor] = []
            hook = self._require(kind[5:]).register_forward_hook(
                lambda _m, args, _out: seen.append(args[0])
            )
            try:
                self.net(images)
            finally:
                hook.remove()
            out = seen[-1]
        else:  # pragma: no cover - table error
            raise UnsupportedModelError(f"unknown reference kind {kind!r}")
        return out, None

    # -- cost model -------------------------------------------------------------------------
    def _profile_of(self, state: BackboneState) -> _Profile:
        # The executor passes views of the state that carry no ``shared`` (runtime.flops.padded);
        # they belong to the batch of the latest ``start``.
        size = state.shared.get("image_size") or self._last_size or self.default_size
        return self._profiles[size]

    def feature_positions(self, layer: int, state: BackboneState) -> int:
        return self._profile_of(state).positions[layer - 1]

    def layer_flops(self, i: int, state: BackboneState) -> torch.Tensor:
        value = self._profile_of(state).block_flops[i]
        return torch.full((state.batch_size,), value, dtype=torch.float64)

    def start_flops(self, state: BackboneState) -> torch.Tensor:
        value = self._profile_of(state).stem_flops
        return torch.full((state.batch_size,), value, dtype=torch.float64)

    def block_flops(self, size: int | Size | None = None) -> tuple[float, list[float]]:
        """(stem FLOPs, per-block FLOPs) for one image of ``size`` (default: the build size)."""
        key = self._as_size(size) if size else self.default_size
        if key not in self._profiles:
            self.check_size(key)
            self._profile(key)
        p = self._profiles[key]
        return p.stem_flops, list(p.block_flops)

    def describe(self) -> dict[str, Any]:
        widths = self._profiles[self.default_size].widths
        return {
            "family": self.family,
            "model_type": self.layout.family,
            "architecture": type(self.net).__name__,
            "num_layers": self.num_layers,
            "hidden_size": widths[-1],
            "widths": widths,
            "in_channels": self.in_channels,
            "image_size": list(self.default_size),
            "task_architecture": type(self._task[0]).__name__ if self._task else None,
        }


def is_vision_model(model: nn.Module) -> bool:
    """True when :class:`VisionBackbone` has a layout for ``model``."""
    return find_vision_layout(model) is not None
