"""UEE-UCB: learn online, without labels, at which exit a stream of inputs should stop.

Paper: Hari Narayan N U, Manjesh K. Hanawal, Avinash Bhardwaj, "Unsupervised Early Exit in
DNNs with Multiple Exits", AI-ML Systems 2022 (arXiv:2209.09480), the UEE-UCB algorithm.
Reference code: github.com/MLiONS/MutiExitDNNs, ``Part2_UEE_UCB_Algorithm_Evaluation.ipynb``,
functions ``update_all`` (the counters), ``find_action`` (the index) and
``run_single_trial`` (the loop, ``alpha = 1``, the last exit played first).

The problem. Exit j has an error rate gamma_j and a cost c_j; the best exit minimises
gamma_j + c_j. Labels never arrive, so gamma_j cannot be estimated. Under *strong dominance*
(an input that some exit gets right is got right by every deeper exit) the error gap to the
first exit is a disagreement rate: gamma_1 - gamma_j = P(yhat_1 != yhat_j). So the exit
minimising gamma_j + c_j maximises the label-free mean reward

    mu_j = P(yhat_1 != yhat_j) + c_1 - c_j.

The bandit. The arms are the exits. Playing arm j runs a sample up to exit j, which reveals
the predictions of exits 1..j; every one of them is an observation (side information): for
each i <= j, ``observed[i] += 1`` and ``disagreed[i] += [yhat_i != yhat_1]``. The next arm is

    argmax_j  disagreed_j / observed_j + c_1 - c_j + sqrt(alpha * log(t + 1) / observed_j),

t the number of samples seen so far, ties to the shallowest exit; the very first sample is
played at the last exit (it observes every exit, so no count is zero afterwards).

This module is the learner alone: it sees predicted class ids, never a model (runtime and
analysis hold the loops: :func:`exitwise.runtime.online.run_stream` runs a stream through the
real executor, :func:`exitwise.analysis.stream.replay_stream` replays it on cached logits).
Its whole state is a few integers, so :meth:`UCBExitSelector.state_dict` is plain JSON and a
stream can stop and resume.

Deviations from the reference:
- Exits are 0-based here (arm 0 is the reference's exit 1).
- One arm can serve a batch of B samples (the runners pick an arm per batch so that the batch
  really runs shorter): the update then adds B observations per exit and advances t by B. A
  stream of batches of one is the reference's algorithm exactly.
- The reference runs offline, on a matrix of every exit's prediction for every sample, and
  averages 20 shuffles of the data. Here :func:`~exitwise.runtime.online.run_stream` runs
  each sample only up to the chosen exit (which reveals exactly what the algorithm reads, so
  the choices do not change) and one stream is one order (``stream_order(n, seed)``);
  :func:`~exitwise.analysis.stream.replay_stream` is the reference's offline setting.
- Costs are given by the caller. :func:`depth_costs` builds the reference's cost structure
  CS-1 (exit depth / number of layers); its ``scale`` (default 1, the reference) weighs cost
  against error: going one layer deeper pays only if it lowers the error rate by more than
  ``scale / num_layers``. The reference's CS-2 (0.5 up to layer 7, else 1) has no helper;
  pass those costs directly.
- ``alpha`` must be a finite number > 0 (the reference fixes 1).
- Like the reference, the counts are cumulative: the selector adapts to a new domain by
  learning on that domain's own unlabeled stream (start a fresh selector there); there is no
  forgetting of an earlier domain (no discount or sliding window).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import ConfigError, InputError

STATE_FORMAT = "exitwise-uee-ucb"
STATE_VERSION = 1


def depth_costs(
    exit_layers: Sequence[int], num_layers: int | None = None, scale: float = 1.0
) -> list[float]:
    """The reference's cost structure CS-1: ``scale * depth / num_layers`` per exit.

    exit_layers: the E exit depths (1-based, e.g. ``model.exit_layers``); num_layers: the
    backbone's depth (default: the deepest exit). ``scale`` weighs cost against error rate.
    """
    layers = [int(d) for d in exit_layers]
    if not layers:
        raise ConfigError("UEE-UCB needs at least one exit to choose from")
    total = max(layers) if num_layers is None else int(num_layers)
    if any(d < 1 or d > total for d in layers):
        raise ConfigError(f"exit depths {layers} must lie in [1, {total}]")
    if not (math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"UEE-UCB: cost scale must be a finite number >= 0, got {scale!r}")
    return [scale * d / total for d in layers]


def uee_rewards(predictions: torch.Tensor, costs: Sequence[float]) -> torch.Tensor:
    """Label-free rewards of the observed exits.

    predictions: (B, m) class ids of exits 0..m-1 for B samples. costs: at least m exit costs.
    Returns (B, m) float64: ``[yhat_j != yhat_0] + c_0 - c_j`` (column 0 is always 0).
    """
    preds = torch.as_tensor(predictions)
    if preds.dim() != 2 or preds.shape[1] < 1:
        raise InputError(f"predictions must be (batch, exits seen), got {tuple(preds.shape)}")
    m = preds.shape[1]
    if m > len(costs):
        raise InputError(f"predictions of {m} exits but only {len(costs)} exit costs")
    cost = torch.tensor([float(c) for c in costs[:m]], dtype=torch.float64)
    disagree = (preds != preds[:, :1]).to(torch.float64)
    return disagree + (cost[0] - cost)


class UCBExitSelector:
    """The UEE-UCB learner over E exits (arms 0..E-1).

    costs: (E,) cost of each exit, in units of error rate (see :func:`depth_costs`).
    alpha: exploration weight of the confidence bonus (the reference's default 1).

    State: ``rounds`` (samples seen), per exit ``observed`` (samples whose prediction at that
    exit was seen) and ``disagreed`` (of those, how many differed from exit 0's prediction).
    """

    def __init__(self, costs: Sequence[float], alpha: float = 1.0) -> None:
        try:
            values = [float(c) for c in costs]
        except (TypeError, ValueError):
            raise ConfigError(f"UEE-UCB: costs must be numbers, got {costs!r}") from None
        if not values:
            raise ConfigError("UEE-UCB needs at least one arm: give one cost per exit")
        if not all(math.isfinite(c) for c in values):
            raise ConfigError(f"UEE-UCB: exit costs must be finite, got {values}")
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            a = math.nan
        if not (math.isfinite(a) and a > 0):
            raise ConfigError(f"UEE-UCB: alpha must be a finite number > 0, got {alpha!r}")
        self.costs: tuple[float, ...] = tuple(values)
        self.alpha = a
        self.rounds = 0
        self.observed = [0] * len(values)
        self.disagreed = [0] * len(values)

    @property
    def num_arms(self) -> int:
        return len(self.costs)

    # -- estimates ---------------------------------------------------------------------------
    def disagreement(self) -> list[float]:
        """(E,) estimated P(yhat_j != yhat_0); 0 for an exit never observed."""
        return [d / n if n else 0.0 for d, n in zip(self.disagreed, self.observed)]

    def mean_rewards(self) -> list[float]:
        """(E,) estimated mean rewards ``P(yhat_j != yhat_0) + c_0 - c_j``."""
        c0 = self.costs[0]
        return [p + c0 - c for p, c in zip(self.disagreement(), self.costs)]

    def indices(self) -> list[float]:
        """(E,) UCB indices ``mean_j + sqrt(alpha log(t + 1) / observed_j)`` (inf where
        unobserved)."""
        log_t = math.log(self.rounds + 1)
        c0 = self.costs[0]
        out = []
        for p, c, n in zip(self.disagreement(), self.costs, self.observed):
            out.append(p + c0 - c + math.sqrt(self.alpha * log_t / n) if n else math.inf)
        return out

    # -- the loop ----------------------------------------------------------------------------
    def select(self) -> int:
        """The arm (exit index) for the next sample(s)."""
        if not all(self.observed):
            # The deepest exit observes every exit: the reference's first round.
            return self.num_arms - 1
        index = self.indices()
        return index.index(max(index))  # ties: the shallowest exit

    def update(self, arm: int, predictions: torch.Tensor) -> torch.Tensor:
        """Record what playing ``arm`` revealed.

        predictions: (B, arm + 1) class ids of exits 0..arm for the B samples played at
        ``arm`` (exactly those exits: deeper ones were not computed).
        Returns (B,) float64: each sample's reward at the played arm.
        """
        given = arm
        try:
            arm = -1 if isinstance(arm, bool) else operator.index(arm)
        except TypeError:
            arm = -1
        if not 0 <= arm < self.num_arms:
            raise InputError(f"arm must be an exit index in [0, {self.num_arms}), got {given!r}")
        preds = torch.as_tensor(predictions)
        if preds.dim() != 2 or preds.shape[1] != arm + 1 or preds.shape[0] < 1:
            raise InputError(
                f"playing arm {arm} reveals exits 0..{arm}: predictions must be "
                f"(batch >= 1, {arm + 1}), got {tuple(preds.shape)}"
            )
        if preds.is_floating_point():
            raise InputError("predictions must be class ids (integers), not scores")
        rows = int(preds.shape[0])
        disagree = (preds != preds[:, :1]).sum(0).tolist()
        for i in range(arm + 1):
            self.observed[i] += rows
            self.disagreed[i] += int(disagree[i])
        self.rounds += rows
        return uee_rewards(preds, self.costs)[:, arm]

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, JSON-able (ints, floats, lists)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "costs": list(self.costs),
            "alpha": self.alpha,
            "rounds": self.rounds,
            "observed": list(self.observed),
            "disagreed": list(self.disagreed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> UCBExitSelector:
        """Resume from :meth:`state_dict` of a selector with the same costs and alpha."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise InputError("not a UEE-UCB state (state_dict of UCBExitSelector, version "
                             f"{STATE_VERSION})")
        costs = tuple(float(c) for c in state.get("costs", ()))
        if costs != self.costs or float(state.get("alpha", math.nan)) != self.alpha:
            raise ConfigError(
                f"the saved state was learned with costs {list(costs)} and alpha "
                f"{state.get('alpha')!r}, this selector has {list(self.costs)} and "
                f"{self.alpha!r}: resume with the same settings (UCBExitSelector.from_state_dict)"
            )
        observed = [int(v) for v in state["observed"]]
        disagreed = [int(v) for v in state["disagreed"]]
        rounds = int(state["rounds"])
        n = self.num_arms
        if len(observed) != n or len(disagreed) != n:
            raise InputError(f"the saved state has counters for {len(observed)} exits, not {n}")
        if rounds < 0 or any(not 0 <= d <= o <= rounds for d, o in zip(disagreed, observed)):
            raise InputError("the saved UEE-UCB counters are inconsistent (need "
                             "0 <= disagreed <= observed <= rounds)")
        self.rounds, self.observed, self.disagreed = rounds, observed, disagreed
        return self

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> UCBExitSelector:
        """A selector with the saved costs and alpha, resumed where the state stopped."""
        try:
            selector = cls(state["costs"], state["alpha"])
        except KeyError as err:
            raise InputError(f"the UEE-UCB state has no {err.args[0]!r}") from None
        return selector.load_state_dict(state)

    def __repr__(self) -> str:
        return (f"UCBExitSelector(arms={self.num_arms}, alpha={self.alpha}, "
                f"rounds={self.rounds})")
