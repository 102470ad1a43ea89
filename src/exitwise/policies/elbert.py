"""``elbert``: ELBERT's confidence-window early exit (Xie et al., "ELBERT: Fast ALBERT with
Confidence-Window Based Early Exit", ICASSP 2021, the two-stage early exit of its method).

A row leaves at exit k when either stage says so:

1. the normalized entropy of exit k, ``H(p_k) / log C``, is below ``threshold`` (strict);
2. over the window of the last ``window`` exits (k-window+1 .. k, so never before exit
   ``window - 1``), one class c holds ``p_c > 0.5 + margin`` at every exit, and, by ``rule``:

   - ``"same"`` (the reference's ``bias_1``, its default): nothing more;
   - ``"rising"`` (``bias_2``): ``p_c`` never decreases along the window (ties allowed);
   - ``"stable"`` (``bias_3``): ``max - min`` of ``p_c`` over the window is at most ``spread``.

Reference: the authors' code, ``shakeley/ELBERT``, ``test_ver/modeling_albert.py``:
``ExitLayer.lower_than_thres`` (both stages; ``x`` is the list of the class-0 probabilities of
the exits run so far) called from ``AlbertTransformer.forward`` after every layer, and the
defaults of its ``config.json``: ``thres_name = "bias_1"``, ``exit_thres = 0.1``,
``cnt_thres = 8`` (the window, on ALBERT-base's 12 exits), ``margin = 0.0``; its readme
names ``bias_1/2/3`` as the
paper's variants of the second stage. Its ``glue_run.sh`` sweeps ``exit_thres`` (0.1 .. 0.9),
which is the tuned parameter here (lower is safer). Only the paper's abstract and introduction
could be read where this was written; the rule follows the code.

Deviations:

- ``window`` defaults to the reference's share of the exits rather than its count: 8 of 12,
  so ``round(2/3 x E)`` of a model's E exits, at most E - 1 (the final exit never decides, so
  a window of E or more never fills: with the reference's 8, any model with fewer than 10
  exits would run stage 1 alone). A window given that cannot fill is refused.
- The reference handles two classes only: it tracks ``p_0`` and asks for all of the window
  ``> 0.5 + margin`` or all ``< 0.5 - margin`` (``rising``: ``p_0`` non-decreasing in the
  first case, non-increasing in the second). Here that reads "one class c has
  ``p_c > 0.5 + margin`` at every exit of the window" (``rising``: ``p_c`` non-decreasing),
  the same rule for C = 2; for C > 2 it keeps 0.5, a majority of the probability.
- The reference decides on ``entropy.mean()`` over its batch, which it runs with batch size 1
  at inference; here every row decides on its own entropy.
- The reference's ``bias_3`` reads its spread from ``config.range_tmp``, which its shipped
  config does not set; here ``spread`` has no default and must be given with ``rule="stable"``.
- ELBERT shares one exit classifier (and ALBERT's pooler) across all layers; exitwise gives
  each exit its own head. The policy itself does not depend on that.

Training: the reference's default (``weight_name = "dyn"``) trains the backbone and all exits
jointly on ``sum_i w_i L_i`` with learned ``w_i = sigmoid(t_i)`` for the internal exits
(``t_i`` initialised to 4, own learning rate 1e-2) and ``w_K = K - sum_i w_i`` for the final
one: the ``elbert`` training strategy (:mod:`exitwise.training.elbert`). Its other option,
``weight_name = "equal"`` (every exit weight 1), is the ``joint`` strategy with
``weights="uniform"`` (the same weights divided by K).

Classification only (entropy and class probabilities).

State: ``window_class`` (B, window) long, per exit of the window the class holding more than
``0.5 + margin`` (-1: none, or not run yet), and ``window_prob`` (B, window) its probability,
oldest first (both (B, 0) until the first exit sizes the window).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import ExitPolicy, PolicyState, register_policy
from .window import normalized_uncertainty

RULES = ("same", "rising", "stable")


@register_policy("elbert")
class ELBERTPolicy(ExitPolicy):
    """Entropy below ``threshold`` or a confident window; logits (B, C) -> (B,) bool."""

    param = "threshold"
    safer_when = "lower"
    param_range = (0.0, 1.0)
    reaches_full_depth = False  # the window stage is not tuned (as in the reference)

    def __init__(
        self,
        threshold: float = 0.1,
        window: int | None = None,
        margin: float = 0.0,
        rule: str = "same",
        spread: float | None = None,
    ) -> None:
        if rule not in RULES:
            raise ConfigError(f"elbert: rule must be one of {', '.join(RULES)}, got {rule!r}")
        if isinstance(window, float) and window.is_integer():
            window = int(window)
        if window is not None and (
                not isinstance(window, int) or isinstance(window, bool) or window < 1):
            raise ConfigError(f"elbert: window must be None or an integer >= 1, got {window!r}")
        if rule == "stable" and spread is None:
            raise ConfigError("elbert: rule='stable' needs spread (the largest max - min of "
                              "the class probability over the window)")
        if rule != "stable" and spread is not None:
            raise ConfigError("elbert: spread only applies to rule='stable'")
        super().__init__(threshold=threshold, window=window, margin=margin, rule=rule,
                         spread=spread)
        self._check_range("margin", margin, (0.0, 0.5))
        if spread is not None:
            self._check_range("spread", spread, (0.0, 1.0))

    def window_for(self, num_exits: int) -> int:
        """The window on a model of ``num_exits`` exits: the one given, else 2/3 of the exits
        (the reference's 8 of 12), at most num_exits - 1; ConfigError for a given window
        that can never fill."""
        given = self.params["window"]
        if given is None:
            return max(1, min(num_exits - 1, round(2 * num_exits / 3)))
        if given >= num_exits:
            raise ConfigError(
                f"elbert: a window of {given} exits never fills on a model of {num_exits} "
                f"exits (the final exit does not decide): give at most {num_exits - 1}, or "
                "leave it out (2/3 of the exits)")
        return int(given)

    def init_state(self, batch_size, device="cpu") -> PolicyState:
        # the window's length comes with the first decision, which knows the exit count
        return {
            "window_class": torch.full((batch_size, 0), -1, dtype=torch.long, device=device),
            "window_prob": torch.zeros(batch_size, 0, device=device),
        }

    def _window_says_exit(self, cls: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
        """(B,) bool from the window (B, N) of confident classes and their probabilities."""
        latest = cls[:, -1:]
        ok = (cls == latest).all(-1) & (latest[:, 0] >= 0)
        rule = self.params["rule"]
        if rule == "rising":
            ok &= (prob[:, 1:] >= prob[:, :-1]).all(-1)
        elif rule == "stable":
            ok &= (prob.amax(-1) - prob.amin(-1)) <= float(self.params["spread"])
        return ok

    def decide(self, exit_index, num_exits, logits, state, labels=None):
        if state["window_class"].shape[1] == 0:  # the first exit: size the window
            n, b = self.window_for(num_exits), logits.shape[0]
            state = {"window_class": torch.full((b, n), -1, dtype=torch.long,
                                                device=logits.device),
                     "window_prob": torch.zeros(b, n, device=logits.device)}
        p = torch.softmax(logits.float(), dim=-1)
        top_prob, top = p.max(-1)
        confident = top_prob > 0.5 + float(self.params["margin"])
        cls = torch.cat([state["window_class"][:, 1:],
                         torch.where(confident, top, torch.full_like(top, -1))[:, None]], 1)
        prob = torch.cat([state["window_prob"][:, 1:], top_prob[:, None]], 1)
        stage1 = normalized_uncertainty(logits, "entropy") < self.value
        return stage1 | self._window_says_exit(cls, prob), {"window_class": cls,
                                                            "window_prob": prob}

    def grid(self, num_exits: int) -> list[float]:
        # The reference sweeps 0.1 .. 0.9; finer near 0, where trained exits are decided.
        fine = [round(0.001 * i, 4) for i in range(50)]
        return sorted(set(fine + [round(0.05 + 0.01 * i, 4) for i in range(96)]))
