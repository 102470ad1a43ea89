"""Shared helpers for the training tests: a learnable token task and a tiny multi-exit BERT."""

from __future__ import annotations

import torch
from conftest import tiny_encoder
from transformers import TrainerCallback

import exitwise as ew

MARK = 7  # label = 1 iff this token id appears in the sequence


def token_items(n: int = 64, seed: int = 0, min_len: int = 4, max_len: int = 12) -> list[dict]:
    """Items {input_ids, attention_mask, labels} of varying length; ids in [8, 99) plus MARK."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(8, 99, (length,), generator=g)
        label = i % 2
        if label:
            ids[int(torch.randint(0, length, (1,), generator=g))] = MARK
        items.append({"input_ids": ids.tolist(), "attention_mask": [1] * length, "labels": label})
    return items


def tiny_model(
    seed: int = 0, layers="all", num_labels: int = 2, **heads
) -> ew.MultiExitModel:
    """A 4-layer random BERT with pooler heads (or the ``head=...`` / ``head_kwargs=...`` /
    ``final_head=...`` given); no dropout anywhere, so runs are reproducible."""
    encoder = tiny_encoder("bert", seed=seed)
    torch.manual_seed(seed)
    return ew.attach_exits(
        encoder, ew.ExitConfig(layers=layers, num_labels=num_labels, dropout=0.0, **heads)
    )


# Trainer settings that keep every test fast and quiet.
FAST = dict(
    use_cpu=True,
    disable_tqdm=True,
    per_device_train_batch_size=16,
    learning_rate=2e-3,
    logging_strategy="no",
    save_strategy="no",
    seed=0,
    dataloader_num_workers=0,
)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class StageRecorder(TrainerCallback):
    """Records, per stage folder, the weights before/after training and the steps seen."""

    def __init__(self) -> None:
        self.before: dict[str, dict] = {}
        self.after: dict[str, dict] = {}
        self.steps: dict[str, list[int]] = {}

    @staticmethod
    def _stage(args) -> str:
        return str(args.output_dir).rstrip("/").rsplit("/", 1)[-1]

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.before[self._stage(args)] = snapshot(model)

    def on_step_end(self, args, state, control, **kw):
        self.steps.setdefault(self._stage(args), []).append(int(state.global_step))

    def on_train_end(self, args, state, control, model=None, **kw):
        self.after[self._stage(args)] = snapshot(model)


class Interrupt(Exception):
    """Raised by :class:`CrashAfterSave` to simulate a killed job."""


class CrashAfterSave(TrainerCallback):
    """Raises right after the checkpoint of ``step`` in stage ``stage`` is written."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage, self.step = stage, step

    def on_save(self, args, state, control, **kw):
        if str(args.output_dir).endswith(self.stage) and state.global_step == self.step:
            raise Interrupt(f"simulated interruption at {self.stage} step {self.step}")
