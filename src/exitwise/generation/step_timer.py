"""Wall-clock of a speculative step's phases, for the draft-length controller.

A step is timed in two phases: drafting (the passes below the exit, or a draft model's) and
verifying (the blocks above, acceptance and bookkeeping); the controller
(:class:`~.draft_control.DraftLengthController`) keeps their costs per active batch size.
On CUDA the clock synchronises first, so a phase's time is its kernels', not their launch.
"""

from __future__ import annotations

import time

import torch

from .draft_control import DraftLengthController


class StepTimer:
    """Wall-clock of a step's draft and verify phases, handed to the controller (if any)."""

    def __init__(self, controller: DraftLengthController | None, device: torch.device,
                 since: float | None = None, excluded: float = 0.0) -> None:
        self.controller = controller
        self.cuda = device.type == "cuda"
        self.t0 = self.now() if controller is not None else 0.0
        self.t1 = self.t0
        # set-up seconds before the draft phase (from ``since``, less ``excluded``: time
        # recorded elsewhere), added to the step's fixed (verify) cost
        self.setup = max(0.0, self.t0 - since - excluded) if since is not None else 0.0
        # seconds of one pass of the blocks below the exit for one position of every row,
        # without the exit head (None: the draft phase was that pass alone, as in plain steps)
        self.unit: float | None = None

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def drafted(self) -> None:
        if self.controller is not None:
            self.t1 = self.now()

    def verified(self, rows: int, q: int, passes: int, positions: int = 1) -> None:
        if self.controller is None:
            return
        t2 = self.now()
        draft = self.t1 - self.t0 if passes else None  # no pass: nothing ran before verifying
        self.controller.record_costs(rows, q, t2 - self.t1 + self.setup, draft, passes,
                                     unit_s=self.unit, positions=positions)
