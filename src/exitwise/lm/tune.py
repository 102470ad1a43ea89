"""``tune_exits``: train a decoder LM's exits with any registered objective, resumably.

    result = ew.tune_exits(model, texts, ew.lm.ExitKLConfig(steps=300), tokenizer=tok,
                           output_dir="runs/kl")
    result = ew.tune_exits(model, answers, "answers")          # a name: the defaults
    print(result.table())                                      # before / after per exit
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..backbones import decoder_of
from ..errors import ConfigError
from .data import weights_checksum
from .loop import run_task
from .objectives import OBJECTIVES, ObjectiveConfig, TuningResult, get_objective


def tune_exits(
    model: Any,
    data: Any,
    config: ObjectiveConfig | str = "ce",
    *,
    tokenizer: Any = None,
    output_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> TuningResult:
    """Train ``model`` with the objective ``config`` on ``data``; one loop for all.

    model: a MultiExitModel over a Hugging Face causal LM (``ce``, ``kl``, ``answers`` tune its
        intermediate ``lm`` exits on a frozen backbone); for ``layerskip``, ``free`` and
        ``calm`` also the HF causal LM itself or its adapter.
    data: what the objective reads: texts (strings with ``tokenizer``, or token-id lists;
        None lets ``ce`` / ``kl`` / ``calm`` use the model's own continuations), or for
        ``answers`` the ``[(prompt_ids, answer_ids), ...]`` of :func:`generate_answers`.
    config: an objective's config (``ew.lm.ExitCEConfig(...)``, ``AnswersConfig``,
        ``ExitKLConfig``, ``LayerSkipConfig``, ``FreeConfig``, ``CalmConfig``, or any
        registered one) or its name for the defaults.
    output_dir: checkpoints go to ``output_dir/<objective>/`` (safetensors + JSON) every
        ``save_every`` steps; with ``resume`` a rerun continues from the last one and ends
        with the weights an uninterrupted run would have.
    """
    if isinstance(config, str):
        config = get_objective(config)
    if not isinstance(config, ObjectiveConfig):
        raise ConfigError(
            f"config must be an objective's config or one of {', '.join(OBJECTIVES)}; "
            f"got {type(config).__name__}"
        )
    seq_len = getattr(config, "seq_len", None)
    decoder = decoder_of(model, "tune_exits")[0]
    limit = getattr(decoder, "max_positions", None)
    if isinstance(seq_len, int) and limit is not None and seq_len > limit:
        # learned absolute positions (GPT-2) past the table would be clamped to its last row
        # in training, a context the model never serves
        raise ConfigError(
            f"seq_len {seq_len} is more than the model's {limit} positions: give seq_len <= "
            f"{limit} (--seq-len on the command line)")
    out = Path(output_dir) if output_dir is not None else None
    # the base weights as given (before a checkpoint's are loaded): a rerun at the same path
    # with other weights must not continue the old run's exits. Whatever form the model
    # comes in (a plain causal LM too, as layerskip / free / calm take it): the same weights
    # give the same checksum.
    base_weights = weights_checksum(decoder)
    prepared = config.build(model, data, tokenizer, out, progress)
    prepared.task.settings = {**prepared.task.settings, "weights": base_weights}
    folder = out / config.registered_name if out is not None else None
    state = run_task(prepared.task, config.loop_settings(prepared.steps), folder, resume,
                     progress, desc=config.registered_name)

    def keyed(values: dict[str, float]) -> dict[Any, float]:
        return {int(k) if k.isdigit() else k: v for k, v in values.items()}

    result = TuningResult(
        objective=config.registered_name, config=config.to_dict(), metric=prepared.metric,
        steps=state.step, start_step=state.start_step, loss_history=state.loss_history,
        part_history=state.part_history, before=keyed(state.before), after=keyed(state.after),
        num_train=prepared.num_train, num_eval=prepared.num_eval,
        output_dir=str(out) if out is not None else None, extras=dict(prepared.extras),
    )
    if prepared.finish is not None:
        prepared.finish(result)
    return result
