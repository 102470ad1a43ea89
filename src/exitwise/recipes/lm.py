"""Decoder-LM recipes: tune exit heads, save them, generate with them (the CLI calls these).

    run_tune_lm(TuneLMJob(out_dir="runs/smol-e8", exit_layers=[8], objective="answers",
                          options={"epochs": 3}))
    model, tok = load_lm("runs/smol-e8")          # exit heads + their base model
    run_generate("runs/smol-e8", ["Hi!"], strategy="self_speculative", exit_layer=8)

A tuned model folder holds what :meth:`MultiExitModel.save_pretrained` writes
(``exit_config.json`` + ``exit_heads.safetensors``; the frozen backbone is *not* copied: it is
reloaded from ``base_model`` in ``lm_recipe.json``), the tokenizer, the tuning checkpoint
(``<objective>/``, so a rerun resumes) and ``tuning_report.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..backbones.special_tokens import eos_and_pad, eos_ids
from ..config import ExitConfig
from ..errors import CheckpointError, ConfigError, DataError
from ..generation import generate
from ..heads.lm import BLOCK_ADAPTERS
from ..lm import generate_answers, get_objective, tune_exits
from ..lm.data import DEFAULT_PROMPTS, cut_at_eos, self_generated_sequences
from ..lm.prompts import BENCH_PROMPTS, CALIBRATION_PROMPTS, nested_chat_prompts
from ..model import BACKBONE_DIR, MultiExitModel, attach_exits
from ..model_io import CONFIG_NAME, remove_model_files
from ..policies.calm_learned import CONFIG_NAME as CALM_CLASSIFIER_CONFIG
from ..policies.calm_learned import WEIGHTS_NAME as CALM_WEIGHTS
from .lm_prompts import CHAT_TUNING_PROMPTS, prompt_batch, prompt_ids
from .smollm import load_causal_lm

RECIPE_NAME = "lm_recipe.json"
REPORT_NAME = "tuning_report.json"
ADAPTERS = ("none", "norm", "mlp", "block", "kangaroo")


@dataclass
class TuneLMJob:
    """One tuning run of a decoder LM's exits, saved to ``out_dir`` (a rerun resumes).

    conditioned: feature-conditioned exits (:class:`~exitwise.heads.lm.LMHead`; trained by
        the "answers" objective, which feeds them the final states).
    objective: any of :data:`exitwise.lm.OBJECTIVES` ("ce", "kl", "answers", "layerskip",
        "free", "calm"); ``options`` are that objective's config options (checked by it: an
        option it does not have is refused with its list).
    data: "answers" tunes on the model's greedy answers (``answer_tokens`` long) to
        ``answers`` prompts built from local text (:func:`~exitwise.lm.prompts.
        corpus_chat_prompts`, never a benchmark or calibration prompt; ``data_dir``); the
        other objectives train on the model's own continuations of chat prompts
        (``num_generations`` per prompt, ``gen_tokens`` long). Both are cached in ``out_dir``.
    prompts_file: the user turns to answer or continue instead (a JSON list of strings, or
        a text file with one per line); with "answers", the first ``answers`` of them.
    device: where the model runs ("cpu", "cuda", "cuda:1", ...): answering tens of thousands
        of prompts (about a second each on the 2-core CPU this was built on) is what a GPU
        is for; the heads saved are the same either way.
    answer_batch_size: prompts answered per batch (larger on a GPU).
    """

    out_dir: str
    model: str = "smollm2"
    exit_layers: list[int] = field(default_factory=lambda: [8])
    adapter: str = "mlp"
    draft_vocab: int | None = None
    conditioned: bool = False
    objective: str = "ce"
    options: dict[str, Any] = field(default_factory=dict)
    answers: int = 256
    answer_tokens: int = 128
    data_dir: str | None = None
    num_generations: int = 2
    gen_tokens: int = 96
    prompts_file: str | None = None
    device: str = "cpu"
    answer_batch_size: int = 32

    def config(self) -> Any:
        """The objective's config (validated now, before any model is loaded)."""
        options = dict(self.options)
        if self.objective != "answers":  # the job makes the continuations: its own fields
            for name, flag, field_name in (("num_generations", "--generations",
                                            "num_generations"),
                                           ("gen_tokens", "--gen-tokens", "gen_tokens"),
                                           ("prompts", "--prompts-file", "prompts_file")):
                if name in options:
                    raise ConfigError(
                        f"option {name} is the job's here (it makes the continuations, and "
                        f"the option would be ignored): give {flag} (TuneLMJob.{field_name})")
        if self.objective != "answers" and "save_every" not in options and "steps" in options:
            options["save_every"] = max(1, min(50, int(options["steps"])))
        config = get_objective(self.objective, **options)
        # The job makes the continuations itself (``num_generations`` x ``gen_tokens``) and
        # hands them over as texts, so the config records those, not its own unused defaults.
        made_here = {name: getattr(self, name) for name in ("num_generations", "gen_tokens")
                     if self.objective != "answers" and hasattr(config, name)}
        return replace(config, **made_here) if made_here else config

    def torch_device(self) -> torch.device:
        """``device`` checked: a ConfigError for a malformed name or a missing GPU."""
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ConfigError(
                f"device must be like 'cpu' or 'cuda:0'; got {self.device!r}") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r}: no CUDA GPU is available here")
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be a CPU or a CUDA GPU; got {self.device!r}")
        return device

    def read_prompts(self) -> list[str] | None:
        """The user turns of ``prompts_file`` (None without one)."""
        if self.prompts_file is None:
            return None
        path = Path(self.prompts_file)
        if not path.is_file():
            raise DataError(f"prompts file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            prompts = json.loads(text)
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise DataError(f"{path} must hold a JSON list of strings")
        else:
            prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"{path} holds no prompts")
        return prompts


def new_token_lists(
    sequences: torch.Tensor, prompt_len: int, eos: set[int]
) -> list[list[int]]:
    """Per row: generated ids up to and including the first EOS (padding after it dropped)."""
    return [cut_at_eos(row, eos) for row in sequences[:, prompt_len:].tolist()]


# -- tuning --------------------------------------------------------------------------------
def run_tune_lm(
    job: TuneLMJob, resume: bool = True, print_fn: Any = print,
    prompts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Attach ``lm`` exits at ``job.exit_layers``, train them with ``job.objective`` on the
    model's own outputs, save everything to ``job.out_dir``; returns the tuning report."""
    if job.adapter not in ADAPTERS:
        raise ConfigError(f"adapter must be one of {', '.join(ADAPTERS)}; got {job.adapter!r}")
    if job.conditioned and job.objective != "answers":
        raise ConfigError("conditioned exits are tuned by the 'answers' objective (it feeds them "
                          f"the final states); got objective {job.objective!r}")
    if job.objective in HEADS_UNTRAINED and (job.draft_vocab or job.adapter in BLOCK_ADAPTERS):
        what = "--draft-vocab" if job.draft_vocab else f"--adapter {job.adapter}"
        raise ConfigError(
            f"the {job.objective!r} objective does not train the exit heads, so {what} would "
            "stay as attached (a draft vocabulary of the first token ids; a random attention "
            "adapter) and draft with that; leave it out, or tune the heads with 'answers'")
    config = job.config()  # options and device checked before anything is removed
    device = job.torch_device()
    out = Path(job.out_dir)
    earlier = _tuned_objective(out)
    if earlier is not None and earlier != job.objective:
        if resume:
            raise ConfigError(
                f"{out} holds exits tuned with the {earlier!r} objective; a {job.objective!r} run "
                "attaches and saves exits of its own, which would replace them. Give another "
                "--out, or --no-resume to start over there")
        # starting over: nothing of the other run may stay beside the new exits (a CALM
        # classifier trained for other exits would be read by generate --policy calm_learned)
        remove_model_files(out, (REPORT_NAME, RECIPE_NAME, CALM_CLASSIFIER_CONFIG, CALM_WEIGHTS))
    elif resume:
        _check_same_heads(out, job)
    if not isinstance(job.answer_batch_size, int) or job.answer_batch_size < 1:
        raise ConfigError(
            f"answer_batch_size must be a positive int; got {job.answer_batch_size!r}")
    if prompts is None:
        prompts = job.read_prompts()
    lm, tokenizer = load_causal_lm(job.model, print_fn=print_fn)
    lm.to(device)
    exit_config = ExitConfig(
        layers=list(job.exit_layers), head="lm", num_labels=int(lm.config.vocab_size),
        head_kwargs={"adapter": job.adapter,
                     **({"draft_vocab": job.draft_vocab} if job.draft_vocab else {}),
                     **({"conditioned": True} if job.conditioned else {})},
        final_head_kwargs={},
    )
    # the fresh heads' draw follows --seed, so the same command gives the same exits
    torch.manual_seed(int(job.options.get("seed", 0)))
    model = attach_exits(lm, exit_config).to(device)
    reused = None
    if job.objective == "answers":
        data: Any = _answers(job, model, tokenizer, out, prompts, print_fn)
    else:
        data, reused = _continuations(job, model, tokenizer, out, prompts, print_fn)
    # written before tuning too, so a rerun of an interrupted run is checked against it; a
    # run tune_exits refuses (other base weights, settings, steps) leaves the folder's own
    earlier_recipe = (out / RECIPE_NAME).read_text() if (out / RECIPE_NAME).is_file() else None
    _write_recipe(out, job)
    try:
        result = tune_exits(model, data, config, tokenizer=tokenizer, output_dir=out,
                            resume=resume)
    except Exception:
        if earlier_recipe is None:
            (out / RECIPE_NAME).unlink(missing_ok=True)
        else:
            (out / RECIPE_NAME).write_text(earlier_recipe)
        raise
    model.save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    _write_recipe(out, job)
    report = {
        "objective": result.objective, "config": result.config, "metric": result.metric,
        "exit_layers": [d for d in model.exit_layers if d < model.backbone.num_layers],
        "steps": result.steps, "before": result.before, "after": result.after,
        "final_loss": result.final_loss, "num_train": result.num_train,
        "num_eval": result.num_eval, "reused_generation_cache": reused,
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str))
    print_fn(result.table())
    return report


# objectives that train no exit head (LayerSkip trains the decoder, CALM its classifier)
HEADS_UNTRAINED = ("layerskip", "calm")


def _tuned_objective(out: Path) -> str | None:
    """The objective of the exits a finished tune-lm run saved in ``out``, or None."""
    report = out / REPORT_NAME
    if not (out / CONFIG_NAME).is_file() or not report.is_file():
        return None
    try:
        return json.loads(report.read_text()).get("objective")
    except (OSError, ValueError):
        return None


ANSWERS_NAME = "greedy_answers.json"
ANSWER_PROMPT_POOL = 2400


# What fixes the shape of the exits a folder holds: a rerun that changes one would load a
# checkpoint of other heads.
HEAD_SETTINGS = ("exit_layers", "adapter", "draft_vocab", "conditioned")


def _write_recipe(out: Path, job: TuneLMJob) -> None:
    # a local folder is recorded absolute, so the tuned folder loads from any directory
    base_model = str(Path(job.model).resolve()) if Path(job.model).is_dir() else job.model
    out.mkdir(parents=True, exist_ok=True)
    (out / RECIPE_NAME).write_text(json.dumps({"base_model": base_model, "job": asdict(job)},
                                              indent=2))


def _check_same_heads(out: Path, job: TuneLMJob) -> None:
    """Refuse a resumed run whose exits differ in shape from those ``out`` was tuned with."""
    try:
        saved = json.loads((out / RECIPE_NAME).read_text()).get("job", {})
    except (OSError, ValueError, AttributeError):
        return  # nothing recorded (or unreadable): the checkpoint's own checks still apply
    asked = json.loads(json.dumps(asdict(job)))  # as saved: a tuple of layers is a list
    differ = [f"{k}={saved[k]!r} there, {asked[k]!r} now" for k in HEAD_SETTINGS
              if k in saved and saved[k] != asked[k]]
    if differ:
        raise ConfigError(
            f"{out} holds exits tuned with other settings ({'; '.join(differ)}); give another "
            "--out, or --no-resume to start over there")


def _continuations(job: TuneLMJob, model: Any, tokenizer: Any, out: Path,
                   prompts: Sequence[str] | None, print_fn: Any) -> tuple[list[list[int]], bool]:
    """(the model's own continuations of chat prompts as token ids, whether they came from
    the cache in ``out``)."""
    ids = prompt_ids(tokenizer, list(prompts or (DEFAULT_PROMPTS + CHAT_TUNING_PROMPTS)))
    eos, pad = eos_and_pad(model.backbone, None, tokenizer.pad_token_id)
    print_fn(f"[tune] {job.num_generations} continuation(s) of {len(ids)} prompts "
             f"(cached in {out})")
    return self_generated_sequences(model, tokenizer, ids, job.num_generations,
                                    job.gen_tokens, int(job.options.get("seed", 0)), pad, eos,
                                    out)


def _answers(
    job: TuneLMJob, model: Any, tokenizer: Any, out: Path, prompts: Sequence[str] | None,
    print_fn: Any,
) -> list[tuple[list[int], list[int]]]:
    """Corpus prompts -> the model's greedy answers (cached in ``out/greedy_answers.json``)."""
    if prompts is None:
        # Nested draws: a larger N extends a smaller one's prompts, so the cached answers of
        # an earlier run are reused (at any N, not only up to the pool).
        seed = int(job.options.get("seed", 0))
        prompts = nested_chat_prompts(
            job.answers, seed=seed, data_dir=job.data_dir,
            exclude=(*BENCH_PROMPTS, *CALIBRATION_PROMPTS), pool=ANSWER_PROMPT_POOL,
        )
    elif len(prompts) < job.answers:
        print_fn(f"[tune] {job.prompts_file} holds {len(prompts)} prompts: answering those "
                 f"{len(prompts)}, not {job.answers}")
    ids = prompt_ids(tokenizer, list(prompts)[: job.answers])
    eos = eos_ids(hf_model(model), tokenizer)
    print_fn(f"[tune] greedy answers to {len(ids)} prompts (cached in {out})")
    answers = generate_answers(
        model, ids, max_new_tokens=job.answer_tokens, batch_size=job.answer_batch_size,
        eos_token_id=sorted(eos) or None, pad_token_id=tokenizer.pad_token_id,
        # answers are the model's own, checked against its weights and budget, so a run
        # started over (resume=False) or grown (more prompts) reuses the ones it has
        cache=out / ANSWERS_NAME,
    )
    print_fn(f"[tune] {sum(len(a) for _, a in answers)} answer tokens; tuning exits "
             f"{list(job.exit_layers)}")
    return answers


def is_tuned_dir(path: str | Path) -> bool:
    return (Path(path) / "exit_config.json").is_file()


def load_lm(name_or_dir: str, print_fn: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer). A folder written by :func:`run_tune_lm` gives a ``MultiExitModel``
    with its tuned exits over the reloaded base model (over the folder's own saved decoder
    when the objective tuned it); anything else (``smollm2``, a local
    HF checkpoint, a hub id) gives the plain causal LM."""
    if not is_tuned_dir(name_or_dir):
        return load_causal_lm(name_or_dir, print_fn=print_fn)
    folder = Path(name_or_dir)
    recipe = folder / RECIPE_NAME
    meta = json.loads((folder / "exit_config.json").read_text())
    if recipe.is_file():
        base = json.loads(recipe.read_text())["base_model"]
    else:  # saved by the library directly: the name recorded with the backbone
        base = meta["backbone"].get("name_or_path")
    own_tokenizer = (folder / "tokenizer_config.json").is_file()
    tuned = folder / BACKBONE_DIR
    if meta.get("backbone_saved") and (tuned / "config.json").is_file() and own_tokenizer:
        # the objective tuned the decoder itself (layerskip, free): the exits belong to its
        # saved weights, not to the base model's
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(str(tuned), dtype=torch.float32).eval()
        tokenizer = None
    else:
        if not base:
            raise CheckpointError(f"{folder} does not record its base model")
        lm, tokenizer = load_causal_lm(base, print_fn=print_fn)
    if own_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
    return MultiExitModel.from_pretrained(folder, backbone=lm), tokenizer


def hf_model(model: Any) -> Any:
    """The Hugging Face causal LM inside ``model`` (itself when it is one)."""
    backbone = getattr(model, "backbone", None)
    return backbone.model if backbone is not None and hasattr(backbone, "model") else model


# -- generation ----------------------------------------------------------------------------
def with_saved_classifier(policy: Any, folder: str | Path) -> Any:
    """``calm_learned`` named without its classifier, run from a folder that holds one (what
    ``tune-lm --objective calm`` saves): that classifier. Any other policy as given."""
    spec = {"name": policy} if isinstance(policy, str) else policy
    if not isinstance(spec, dict) or spec.get("name") != "calm_learned" or \
            spec.get("classifier") is not None:
        return policy
    if not (Path(folder) / CALM_CLASSIFIER_CONFIG).is_file():
        return policy
    return {**spec, "classifier": str(folder)}


def run_generate(
    model_or_dir: Any,
    prompts: Sequence[str],
    strategy: str = "self_speculative",
    exit_layer: int | None = None,
    draft_len: int | str | None = None,
    max_new_tokens: int = 128,
    chat: bool | None = None,
    tokenizer: Any = None,
    do_sample: bool = False,
    seed: int | None = None,
    policy: Any = None,
    print_fn: Any = None,
    kv: str | None = None,
    draft_threshold: float | None = None,
    kernels: str | None = None,
    ngram: int | None = None,
    tree_width: int | str | None = None,
    skip: Any = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> dict[str, Any]:
    """Generate continuations of ``prompts``; returns {"texts": [...], "stats": {...}}.

    ``model_or_dir``: a tuned folder, a model name/path, or an already loaded model (then give
    ``tokenizer``). ``exit_layer`` defaults to the model's shallowest tuned exit, or for a
    plain model to the drafter shipped for it (``generate`` resolves both). ``skip``: what
    ``strategy="layer_skip"`` drafts without (blocks or (block, part) pairs).
    ``policy``: the token-level exit policy of ``strategy="early_exit"`` (object, name or dict).
    ``temperature``, ``top_k``, ``top_p``: how ``do_sample`` shapes the distribution.
    """
    if isinstance(model_or_dir, (str, Path)):
        model, tokenizer = load_lm(str(model_or_dir), print_fn=print_fn)
        policy = with_saved_classifier(policy, model_or_dir)
    else:
        model = model_or_dir
        if tokenizer is None:
            raise ConfigError("give the tokenizer with an already loaded model")
    device = hf_model(model).get_output_embeddings().weight.device
    ids, mask = prompt_batch(tokenizer, prompts, device, chat)
    # Options left None count as not given; one given that the strategy does not have is
    # refused by generate, naming the strategy it belongs to (never silently dropped).
    given = {"exit_layer": exit_layer, "draft_len": draft_len,
             "draft_threshold": draft_threshold, "policy": policy, "kv": kv, "ngram": ngram,
             "tree_width": tree_width, "skip": skip}
    out = generate(model, ids, mask, strategy=strategy, max_new_tokens=max_new_tokens,
                   do_sample=do_sample, seed=seed, tokenizer=tokenizer, kernels=kernels,
                   temperature=temperature, top_k=top_k, top_p=top_p, **given)
    eos = eos_ids(hf_model(model), tokenizer)
    new = new_token_lists(out.sequences, ids.shape[1], eos)
    decoded = [tokenizer.decode(t, skip_special_tokens=True) for t in new]
    return {"texts": decoded, "new_tokens": [len(t) for t in new], "stats": out.stats.to_dict()}
