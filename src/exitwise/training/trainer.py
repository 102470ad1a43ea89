"""``ExitTrainer``: the Hugging Face Trainer, taught to train one stage of a multi-exit strategy.

What changes from the stock Trainer:

- ``compute_loss`` validates the labels, updates the stage's ``progress`` (step, epoch,
  learning rate), runs the model once (all exits' logits, with the stage's
  ``forward_kwargs``) and asks the stage for the loss, or hands the batch to the stage's own
  ``step`` when it has one (meta-learning strategies). The loss is a per-batch mean, so the
  Trainer divides it by the number of gradient-accumulation steps itself
  (``loss_is_scaled_for_ga = False``).
- The MultiExitModel is a plain ``nn.Module`` with aliased tensors; checkpoints are written as
  one ``model.safetensors`` with one name per tensor and read back strictly (no pickled model).
  Optimizer, scheduler and RNG states are the Trainer's own files, which makes resuming exact
  for datasets whose items are fixed. Random augmentation is not replayed exactly: the data
  loader reads one batch ahead of the saved RNG state (and workers are seeded before it is
  restored), so a resumed run draws other augmentations from the resume point on.
- ``group_by_length`` batches come from a sampler whose shuffle is a function of (seed,
  epoch): the stock one draws it from the global RNG when an epoch starts, which a resume in
  the middle of an epoch does before restoring that RNG, so the resumed epoch saw other
  batches (some rows twice, others never).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from ..checkpoint import STAGE_WEIGHTS, load_model_weights, save_model_weights
from ..errors import CheckpointError, InputError
from ..lm.data import derived_seed
from .base import Stage
from .evaluate import evaluate_exits


def _labels_of(inputs: dict[str, Any]) -> torch.Tensor:
    if "labels" in inputs:
        return inputs["labels"]
    if "label" in inputs:
        return inputs["label"]
    raise InputError(
        f"the training batch has no 'labels' (keys: {', '.join(inputs)}); "
        "the dataset items must carry integer class labels"
    )


def _freeze_frozen_norm_statistics(model: torch.nn.Module) -> None:
    """Put batch-norm layers whose parameters are all frozen in this stage in eval mode.

    The Trainer switches the whole model to train mode every step; a frozen backbone's
    BatchNorm would then still update its running statistics (and normalise with batch
    statistics), silently changing the network a frozen-backbone strategy promises to keep.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Transformers' length-grouped order, shuffled by a generator seeded with (seed, epoch)
    (the Trainer calls :meth:`set_epoch` at each epoch, a resumed run included)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


class ExitTrainer(Trainer):
    """A Trainer for one :class:`~exitwise.training.base.Stage` of a strategy."""

    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, stage: Stage, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage = stage
        # MultiExitModel.forward takes **inputs; the Trainer would read that as "accepts
        # num_items_in_batch" and feed it to the model. The stage computes its own mean loss.
        self.model_accepts_loss_kwargs = False

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochSeededLengthSampler(sampler.batch_size, sampler.lengths, seed)
        return sampler

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        labels = _labels_of(inputs)
        features = {k: v for k, v in inputs.items() if k not in ("labels", "label")}
        core = self.accelerator.unwrap_model(model)
        ref = features.get("input_ids", features.get("inputs_embeds"))
        labels = core.check_labels(labels, None if ref is None else int(ref.shape[0]))
        if model.training:
            self._update_progress()
            _freeze_frozen_norm_statistics(core)
        if self.stage.step is not None and model.training:
            loss, outputs = self.stage.step(model, features, labels)
        else:
            outputs = model(**features, **self.stage.forward_kwargs)
            loss = self.stage.loss(outputs, labels)
        if outputs is not None:
            outputs.loss = loss
        return (loss, outputs) if return_outputs else loss

    def _update_progress(self) -> None:
        p = self.stage.progress
        p.step = int(self.state.global_step)
        p.max_steps = int(self.state.max_steps) if self.state.max_steps else None
        p.epoch = float(self.state.epoch or 0.0)
        epochs = getattr(self.state, "num_train_epochs", 0) or self.args.num_train_epochs
        p.num_epochs = max(1, int(math.ceil(epochs))) if epochs else None
        if self.optimizer is not None and self.optimizer.param_groups:
            p.learning_rate = float(self.optimizer.param_groups[0]["lr"])

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Per-exit accuracy on the eval set, logged as ``eval_exit{k}_accuracy``;
        ``eval_accuracy`` is the final exit's (usable as ``metric_for_best_model``)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise InputError("evaluation needs an eval_dataset")
        accs = evaluate_exits(
            self.model,
            dataset,
            self.data_collator,
            self.args.per_device_eval_batch_size,
            progress=not self.args.disable_tqdm,
        )
        metrics = {f"{metric_key_prefix}_exit{k}_accuracy": a for k, a in enumerate(accs)}
        metrics[f"{metric_key_prefix}_mean_exit_accuracy"] = sum(accs) / len(accs)
        metrics[f"{metric_key_prefix}_accuracy"] = accs[-1]
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    # -- checkpoints: safetensors, one name per tensor -------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_model_weights(self.model, os.path.join(output_dir, STAGE_WEIGHTS), state_dict)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        if getattr(self.stage.step, "stateful", False):
            raise CheckpointError(
                f"stage {self.stage.name!r} meta-learns state outside the model (its weighting "
                "network / fusion weights), which checkpoints do not hold, so it cannot resume "
                f"exactly from {resume_from_checkpoint}; delete that checkpoint to rerun the stage"
            )
        path = os.path.join(resume_from_checkpoint, STAGE_WEIGHTS)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not os.path.isfile(path):
            # Sharded engines keep their own formats; let the Trainer handle them.
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_model_weights(model if model is not None else self.model, path)

    def _load_best_model(self) -> None:
        # The stock path warns about missing keys through PreTrainedModel-only attributes,
        # which a plain nn.Module lacks; our loader checks strictly instead.
        path = os.path.join(self.state.best_model_checkpoint, STAGE_WEIGHTS)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not os.path.isfile(path):
            return super()._load_best_model()
        load_model_weights(self.model, path)
