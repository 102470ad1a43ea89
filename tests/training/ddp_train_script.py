"""Run by test_training_ddp.py under ``torch.distributed.run`` (2 CPU processes, gloo).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_train_script.py OUT
Each rank writes OUT/rank-<r>.json with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from helpers.trainkit import FAST, tiny_model, token_items  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from exitwise.training import train  # noqa: E402


class Seen(TrainerCallback):
    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    def on_train_end(self, args, state, control, model=None, **kw):
        self.stages[Path(args.output_dir).name] = {
            "world_size": args.world_size,
            "parallel_mode": str(args.parallel_mode),
            "global_step": state.global_step,
            # identical on both ranks iff DDP kept the replicas in sync
            "checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        }


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    seen = Seen()
    model = tiny_model()
    train(
        model,
        token_items(32, seed=0),
        strategy="two_stage",
        output_dir=out / "run",
        callbacks=[seen],
        **{**FAST, "per_device_train_batch_size": 8, "max_steps": 3, "ddp_backend": "gloo"},
    )
    report = {"rank": rank, "finished": True, "stages": seen.stages}
    (out / f"rank-{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
