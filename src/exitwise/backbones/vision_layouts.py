"""Where each vision model keeps its parts, keyed by model class (or HF ``model_type``).

This table is the only per-architecture knowledge :class:`~exitwise.backbones.vision.VisionBackbone`
has. Every entry names the model's own modules by attribute path; the adapter calls them in
order and never copies a ``forward``. Keys are strings (``module.QualName``), so looking a
model up imports neither timm nor torchvision.

A *block* is the finest unit an exit may follow: a residual block of a ResNet stage, a
transformer block, a ConvNeXt block (the stage's downsampling layer runs at the start of the
stage's first block), an inverted-residual block of a MobileNet.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class VisionLayout:
    """Attribute paths (dotted, relative to the model; ``a|b`` = the first that exists).

    stem:      called in order by ``start`` on the image batch (modules or bound methods,
               e.g. timm ViT's ``_pos_embed``).
    stages:    containers whose children are the blocks, in order (ResNet ``layer1..4``,
               ViT ``blocks``). Mutually exclusive with ``stage_list``.
    stage_list: one container whose children are stages (timm ConvNeXt ``stages``).
    stage_pre: module of a stage run before its first block (ConvNeXt ``downsample``).
    stage_blocks: path inside a stage to the container of its blocks (ConvNeXt ``blocks``).
    skip:      children of the first stage that belong to the stem (MobileNet ``features.0``).
    neck:      run after the last block (final norm, global pooling module), then ``pool``.
    pool:      how the neck ends: ``"timm"`` = ``model.forward_head(x, pre_logits=True)``,
               ``"flatten"``, ``"avg"`` (global average pool + flatten), ``"cls"`` (token 0).
    reference: the model's own feature forward: ``"timm"`` (``forward_features`` +
               ``forward_head(pre_logits=True)``), ``"hook:<path>"`` (the input of the
               classifier module at ``path`` during the model's own ``forward``) or ``"hf-cls"``
               (``last_hidden_state[:, 0]`` of the HF base model).
    tokens:    blocks carry (B, T, H) token sequences instead of (B, C, H, W) feature maps.
    size_rule: image sizes accepted: ``"probe"`` (whatever the layers can take, found by a
               one-image trial run), ``"timm-patch"`` (timm PatchEmbed rules), ``"hf-fixed"``
               (exactly ``config.image_size``).
    """

    family: str
    stem: tuple[str, ...]
    neck: tuple[str, ...] = ()
    pool: str = "timm"
    reference: str = "timm"
    stages: tuple[str, ...] = ()
    stage_list: str | None = None
    stage_pre: str | None = None
    stage_blocks: str | None = None
    skip: int = 0
    tokens: bool = False
    size_rule: str = "probe"


_TIMM_RESNET = VisionLayout(
    "timm-resnet",
    stem=("conv1", "bn1", "act1", "maxpool"),
    stages=("layer1", "layer2", "layer3", "layer4"),
)
_TIMM_VIT = VisionLayout(
    "timm-vit",
    stem=("patch_embed", "_pos_embed", "patch_drop", "norm_pre"),
    stages=("blocks",),
    neck=("norm",),
    tokens=True,
    size_rule="timm-patch",
)
_TIMM_CONVNEXT = VisionLayout(
    "timm-convnext",
    stem=("stem",),
    stage_list="stages",
    stage_pre="downsample",
    stage_blocks="blocks",
    neck=("norm_pre",),
)
_TV_RESNET = VisionLayout(
    "torchvision-resnet",
    stem=("conv1", "bn1", "relu", "maxpool"),
    stages=("layer1", "layer2", "layer3", "layer4"),
    neck=("avgpool",),
    pool="flatten",
    reference="hook:fc",
)
_TV_MOBILENET_V2 = VisionLayout(
    "torchvision-mobilenet_v2",
    stem=("features.0",),
    stages=("features",),
    skip=1,
    pool="avg",  # MobileNetV2 pools with a function call, there is no module to call
    reference="hook:classifier",
)
_TV_MOBILENET_V3 = VisionLayout(
    "torchvision-mobilenet_v3",
    stem=("features.0",),
    stages=("features",),
    skip=1,
    neck=("avgpool",),
    pool="flatten",
    reference="hook:classifier",
)
_HF_VIT = VisionLayout(
    "hf-vit",
    stem=("embeddings",),
    stages=("layers|encoder.layer",),  # transformers 5 keeps the layers on the model itself
    neck=("layernorm",),
    pool="cls",
    reference="hf-cls",
    tokens=True,
    size_rule="hf-fixed",
)

VISION_LAYOUTS: dict[str, VisionLayout] = {
    "timm.models.resnet.ResNet": _TIMM_RESNET,
    "timm.models.vision_transformer.VisionTransformer": _TIMM_VIT,  # also DeiT
    "timm.models.convnext.ConvNeXt": _TIMM_CONVNEXT,
    "torchvision.models.resnet.ResNet": _TV_RESNET,
    "torchvision.models.mobilenetv2.MobileNetV2": _TV_MOBILENET_V2,
    "torchvision.models.mobilenetv3.MobileNetV3": _TV_MOBILENET_V3,
    "hf:vit": _HF_VIT,  # transformers ViTModel / ViTForImageClassification (by model_type)
}


def _class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def find_vision_layout(model: nn.Module) -> tuple[str, VisionLayout] | None:
    """(table key, layout) for ``model``, or None. Subclasses match their parent's row."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and f"hf:{model_type}" in VISION_LAYOUTS:
        key = f"hf:{model_type}"
        return key, VISION_LAYOUTS[key]
    for cls in type(model).__mro__:
        key = _class_key(cls)
        if key in VISION_LAYOUTS:
            return key, VISION_LAYOUTS[key]
    return None


def supported_vision_models() -> list[str]:
    return sorted(VISION_LAYOUTS)
