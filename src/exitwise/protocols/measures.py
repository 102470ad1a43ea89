"""The vision literature's evaluation protocols, all from cached all-exit logits.

Every function returns a JSON-able dict (``"protocol"`` names it); the matching plot lives in
:mod:`exitwise.protocols.plots`. Compute is always *relative*: mean FLOPs over the
mean FLOPs of the plain full-depth model (no exit heads), so the last exit of a multi-exit
network costs slightly more than 1.

* :func:`anytime`: each exit's accuracy against its cost (MSDNet's anytime prediction).
* :func:`budgeted_batch`: MSDNet budgeted batch; thresholds fitted on a *held-out* cache for
  each budget, accuracy and cost measured on the *test* cache.
* :func:`fixed_cost_table`: accuracy at 25/50/75/100% of the full FLOPs, never interpolated:
  the deepest single exit that fits, and the budget policy fitted on held-out data for that
  budget (its test cost is reported, and whether it stayed within the budget).
* :func:`overthinking_report`: SDN's wasteful / destructive overthinking (reuses
  :func:`~exitwise.analysis.metrics.overthinking`).
* :func:`selective_classification`: risk-coverage curve of the top probability at each row's
  exit, coverage at given risks (thresholds chosen on held-out data when given).
* :func:`ood_auroc`: a window policy on in-distribution vs OOD caches; AUROC of the
  uncertainty at each row's exit (OOD = positive).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from ..analysis.cache import ExitLogitsCache
from ..analysis.metrics import overthinking, per_exit_accuracy, relative_exit_costs
from ..analysis.replay import ReplayResult, replay
from ..calibration.budget import fit_budget_policy
from ..errors import ConfigError, InputError
from ..policies.base import ExitPolicy
from ..policies.window import WindowPolicy
from ..temperatures import temperature_list

Temps = torch.Tensor | Sequence[float] | None
DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_RISKS = (0.01, 0.02, 0.05, 0.1)


def _scaled_exit_logits(cache: ExitLogitsCache, exit_index: torch.Tensor, temperatures: Temps):
    """(N, C) logits at each row's exit, divided by that exit's temperature as the executor
    does."""
    temps = torch.tensor(temperature_list(temperatures, cache.num_exits), dtype=torch.float32)
    rows = torch.arange(cache.num_examples)
    logits = cache.logits[rows, exit_index]
    scale = temps[exit_index]
    return torch.where((scale != 1.0).unsqueeze(1), logits / scale.unsqueeze(1), logits)


# -- anytime ---------------------------------------------------------------------------------
def anytime(cache: ExitLogitsCache) -> dict[str, Any]:
    """Each exit's accuracy vs its relative cost (every row leaves at that exit)."""
    cache.check(need_labels=True)
    acc = per_exit_accuracy(cache)
    rel = relative_exit_costs(cache)
    points = [
        {
            "exit": k,
            "layer": cache.exit_layers[k],
            "accuracy": float(acc[k]),
            "relative_compute": float(rel[k]),
            "mean_flops": float(cache.costs[:, k].mean()),
        }
        for k in range(cache.num_exits)
    ]
    return {"protocol": "anytime", "points": points, "full_accuracy": float(acc[-1]),
            "num_examples": cache.num_examples}


# -- budgeted batch --------------------------------------------------------------------------
def _check_pair(heldout: ExitLogitsCache, test: ExitLogitsCache) -> None:
    heldout.check(need_labels=True)
    test.check(need_labels=True)
    if heldout.exit_layers != test.exit_layers or heldout.num_classes != test.num_classes:
        raise InputError("held-out and test caches come from different models")
    if heldout is test:
        warnings.warn("thresholds fitted and evaluated on the same cache: the numbers are "
                      "optimistic; pass a held-out split", UserWarning, stacklevel=3)


def default_budgets(cache: ExitLogitsCache, count: int = 20) -> list[float]:
    """``count`` budgets spread evenly from the first exit's to the last exit's relative
    cost."""
    rel = relative_exit_costs(cache)
    lo, hi = float(rel[0]), float(rel[-1])
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def budgeted_batch(
    heldout: ExitLogitsCache,
    test: ExitLogitsCache,
    budgets: Sequence[float] | None = None,
    temperatures: Temps = None,
) -> dict[str, Any]:
    """MSDNet budgeted batch: accuracy vs mean cost on ``test`` across budgets, the per-exit
    thresholds of each budget fitted on ``heldout``
    (:func:`exitwise.calibration.budget.fit_budget_policy`)."""
    _check_pair(heldout, test)
    budgets = list(budgets) if budgets is not None else default_budgets(heldout)
    fit = fit_budget_policy(heldout, budgets, temperatures=temperatures)
    points = []
    for fitted in fit.points:
        res = replay(fit.policy.with_param(fitted["budget"]), test, temperatures)
        metrics = res.metrics()
        points.append({
            "budget": fitted["budget"],
            "q": fitted["q"],
            "accuracy": metrics["accuracy"],
            "relative_compute": metrics["relative_compute"],
            "mean_flops": metrics["mean_flops"],
            "flops_speedup": metrics["flops_speedup"],
            "exit_fractions": [v / test.num_examples for v in metrics["exit_histogram"]],
            "thresholds": fitted["thresholds"],
            "heldout_accuracy": fitted["heldout"]["accuracy"],
            "heldout_relative_compute": fitted["heldout"]["relative_compute"],
        })
    return {"protocol": "budgeted_batch", "fit_on": "heldout", "evaluated_on": "test",
            "points": points, "policy": fit.policy.to_dict(), "exit_costs": fit.costs}


# -- fixed-cost table ------------------------------------------------------------------------
def fixed_cost_table(
    heldout: ExitLogitsCache,
    test: ExitLogitsCache,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    temperatures: Temps = None,
) -> dict[str, Any]:
    """Accuracy at fixed fractions of the full-depth FLOPs (never interpolated).

    For each fraction f: ``static`` is the deepest single exit whose test cost is <= f (None if
    even the first exit costs more); ``budgeted`` is the budget policy fitted on ``heldout`` at
    budget f, replayed on ``test`` (None if f is below the first exit's cost), with
    ``within_budget`` telling whether its test cost stayed <= f.
    """
    _check_pair(heldout, test)
    if not fractions or any(not (0 < float(f) <= 10) for f in fractions):
        raise ConfigError(f"fractions must be positive fractions of the full cost, got {fractions}")
    acc = per_exit_accuracy(test)
    rel = relative_exit_costs(test)
    first = float(relative_exit_costs(heldout)[0])
    rows = []
    for f in (float(x) for x in fractions):
        fits = [k for k in range(test.num_exits) if float(rel[k]) <= f + 1e-12]
        static = None
        if fits:
            k = fits[-1]
            static = {"exit": k, "accuracy": float(acc[k]), "relative_compute": float(rel[k])}
        budgeted = None
        if f >= first:
            fit = fit_budget_policy(heldout, [f], temperatures=temperatures)
            res = replay(fit.policy, test, temperatures)
            budgeted = {"accuracy": res.accuracy, "relative_compute": res.relative_compute,
                        "within_budget": res.relative_compute <= f + 1e-12,
                        "thresholds": fit.points[0]["thresholds"]}
        rows.append({"fraction": f, "static": static, "budgeted": budgeted})
    return {
        "protocol": "fixed_cost",
        "method": "best-under-budget, not interpolated: static = deepest exit costing <= f on "
                  "test; budgeted = MSDNet thresholds fitted on held-out for budget f, "
                  "reported on test",
        "rows": rows,
        "full_accuracy": float(acc[-1]),
    }


# -- SDN overthinking ------------------------------------------------------------------------
def overthinking_report(cache: ExitLogitsCache) -> dict[str, Any]:
    """SDN overthinking numbers plus each exit's accuracy (for the plot)."""
    report = overthinking(cache)
    return {"protocol": "overthinking", **report,
            "per_exit_accuracy": per_exit_accuracy(cache).tolist(),
            "exit_layers": list(cache.exit_layers)}


# -- selective classification ----------------------------------------------------------------
def risk_coverage(confidence: torch.Tensor, correct: torch.Tensor) -> dict[str, Any]:
    """Risk-coverage curve: accept the rows whose confidence is >= a threshold.

    confidence: (N,) higher = more trusted; correct: (N,) bool. Returns one point per distinct
    confidence value, most confident first: ``threshold``, ``coverage`` (fraction accepted),
    ``risk`` (error rate among the accepted), and ``aurc`` (area under the curve, the mean
    risk over coverages).
    """
    conf = torch.as_tensor(confidence, dtype=torch.float64).reshape(-1)
    ok = torch.as_tensor(correct).reshape(-1).bool()
    if conf.numel() == 0 or conf.numel() != ok.numel():
        raise InputError("risk_coverage needs as many (>= 1) confidences as correctness flags")
    order = conf.argsort(descending=True, stable=True)
    conf, errors = conf[order], (~ok[order]).double()
    n = conf.numel()
    cum_err = errors.cumsum(0)
    # Rows with equal confidence are accepted together: keep the last index of each run.
    last = torch.ones(n, dtype=torch.bool)
    last[:-1] = conf[1:] != conf[:-1]
    idx = last.nonzero().squeeze(1)
    accepted = (idx + 1).double()
    coverage = accepted / n
    risk = cum_err[idx] / accepted
    # Area with a step per accepted row (the standard AURC of Geifman et al.).
    aurc = float((cum_err / torch.arange(1, n + 1, dtype=torch.float64)).mean())
    return {"threshold": conf[idx].tolist(), "coverage": coverage.tolist(),
            "risk": risk.tolist(), "aurc": aurc}


def coverage_at_risk(curve: dict[str, Any], risk: float) -> tuple[float, float | None]:
    """(largest coverage whose risk is <= ``risk``, its threshold); (0, None) if none."""
    best, thr = 0.0, None
    for c, r, t in zip(curve["coverage"], curve["risk"], curve["threshold"]):
        if r <= risk + 1e-12 and c > best:
            best, thr = c, t
    return best, thr


def _exit_confidence(policy: ExitPolicy | None, cache: ExitLogitsCache, temperatures: Temps):
    """(exit_index, confidence at the exit, correct) of ``policy`` (None: the last exit)."""
    outputs = None
    if policy is None:
        exit_index = torch.full((cache.num_examples,), cache.num_exits - 1, dtype=torch.long)
    else:
        res = replay(policy, cache, temperatures)
        exit_index, outputs = res.exit_index, res.outputs  # outputs: an ensemble's, or None
    logits = outputs if outputs is not None else _scaled_exit_logits(
        cache, exit_index, temperatures)
    confidence = torch.softmax(logits.float(), dim=-1).amax(-1)
    correct = logits.argmax(-1) == cache.labels
    return exit_index, confidence, correct


def selective_classification(
    test: ExitLogitsCache,
    policy: ExitPolicy | None = None,
    temperatures: Temps = None,
    risks: Sequence[float] = DEFAULT_RISKS,
    heldout: ExitLogitsCache | None = None,
) -> dict[str, Any]:
    """Selective classification with the top probability at each row's exit as the score.

    policy: the exit policy whose exits are scored (None: everyone at the last exit).
    heldout: when given, the threshold for each target risk is chosen on it (largest held-out
        coverage within the risk) and the test coverage and risk at that threshold are
        reported; without it the test curve's own best coverage is reported and labelled
        ``"empirical"`` (an oracle choice of threshold).
    """
    test.check(need_labels=True)
    _, conf, correct = _exit_confidence(policy, test, temperatures)
    curve = risk_coverage(conf, correct)
    at: list[dict[str, Any]] = []
    if heldout is not None:
        heldout.check(need_labels=True)
        _, h_conf, h_correct = _exit_confidence(policy, heldout, temperatures)
        h_curve = risk_coverage(h_conf, h_correct)
    for r in risks:
        if heldout is None:
            cov, thr = coverage_at_risk(curve, float(r))
            at.append({"risk_target": float(r), "threshold": thr, "coverage": cov})
            continue
        _, thr = coverage_at_risk(h_curve, float(r))
        if thr is None:
            at.append({"risk_target": float(r), "threshold": None, "coverage": 0.0,
                       "risk": None})
            continue
        accept = conf >= thr
        n_acc = int(accept.sum())
        test_risk = float((~correct[accept]).double().mean()) if n_acc else None
        at.append({"risk_target": float(r), "threshold": thr,
                   "coverage": n_acc / test.num_examples, "risk": test_risk})
    return {
        "protocol": "selective_classification",
        "policy": None if policy is None else policy.to_dict(),
        "threshold_from": "heldout" if heldout is not None else "empirical",
        "accuracy": float(correct.double().mean()),
        "aurc": curve["aurc"],
        "at_risk": at,
        "curve": _thin({"coverage": curve["coverage"], "risk": curve["risk"]}),
    }


def _thin(curve: dict[str, list[float]], max_points: int = 400) -> dict[str, list[float]]:
    """At most ``max_points`` evenly spaced points of each list (always keeping the ends)."""
    n = len(next(iter(curve.values())))
    if n <= max_points:
        return curve
    keep = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return {k: [v[i] for i in keep] for k, v in curve.items()}


# -- OOD detection with the window policy ----------------------------------------------------
def window_outcome(
    policy: WindowPolicy, cache: ExitLogitsCache, temperatures: Temps = None
) -> dict[str, Any]:
    """Replay a window policy and read, at each row's exit, its uncertainty and whether the
    policy flags it rejected (``policy.rejected``: uncertainty above the operating threshold,
    at any exit including the last). With ``ensemble`` the uncertainty is that of what the row
    returned (the ensemble of the exits it saw).

    Returns ``{"replay": ReplayResult, "uncertainty": (N,), "rejected": (N,) bool}``.
    """
    if not isinstance(policy, WindowPolicy):
        raise ConfigError(f"window_outcome needs a window policy, got {type(policy).__name__}")
    res: ReplayResult = replay(policy, cache, temperatures)
    if res.outputs is not None:  # the policy changed what rows return (an ensemble)
        returned = res.outputs
    else:
        returned = _scaled_exit_logits(cache, res.exit_index, temperatures)
    return {"replay": res, "uncertainty": policy.uncertainty(returned),
            "rejected": policy.rejected(returned)}


def auroc(negative: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of a score where ``positive`` rows should score higher
    (Mann-Whitney U with tied scores counted as one half)."""
    neg = torch.as_tensor(negative, dtype=torch.float64).reshape(-1)
    pos = torch.as_tensor(positive, dtype=torch.float64).reshape(-1)
    if neg.numel() == 0 or pos.numel() == 0:
        raise InputError("AUROC needs at least one row on each side")
    scores = torch.cat([neg, pos])
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True,
                                      return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based, ties share their mean rank
    ranks = avg_rank[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    u = float(ranks[n_neg:].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def roc_curve(negative: torch.Tensor, positive: torch.Tensor) -> dict[str, list[float]]:
    """(fpr, tpr) at every distinct score, highest threshold first, starting at (0, 0)."""
    neg = torch.as_tensor(negative, dtype=torch.float64).reshape(-1)
    pos = torch.as_tensor(positive, dtype=torch.float64).reshape(-1)
    thresholds = torch.unique(torch.cat([neg, pos]), sorted=True).flip(0)
    tpr = (pos.unsqueeze(0) >= thresholds.unsqueeze(1)).double().mean(1)
    fpr = (neg.unsqueeze(0) >= thresholds.unsqueeze(1)).double().mean(1)
    return {"fpr": [0.0] + fpr.tolist(), "tpr": [0.0] + tpr.tolist()}


def ood_auroc(
    policy: WindowPolicy,
    in_dist: ExitLogitsCache,
    ood: ExitLogitsCache,
    temperatures: Temps = None,
) -> dict[str, Any]:
    """OOD detection by a window cascade: score = uncertainty at each row's exit.

    in_dist, ood: caches of the same model on in-distribution and out-of-distribution inputs
    (OOD labels may be unknown). Reports AUROC (OOD positive), FPR at 95% TPR, and per side
    the fraction flagged rejected, the exit histogram and the mean relative compute.
    """
    if in_dist.exit_layers != ood.exit_layers or in_dist.num_classes != ood.num_classes:
        raise InputError("in-distribution and OOD caches come from different models")
    sides = {"in_dist": window_outcome(policy, in_dist, temperatures),
             "ood": window_outcome(policy, ood, temperatures)}
    u_id, u_ood = sides["in_dist"]["uncertainty"], sides["ood"]["uncertainty"]
    roc = roc_curve(u_id, u_ood)
    fpr95 = min((f for f, t in zip(roc["fpr"], roc["tpr"]) if t >= 0.95), default=1.0)
    summary = {}
    for name, out in sides.items():
        res: ReplayResult = out["replay"]
        summary[name] = {
            "num_examples": int(res.exit_index.numel()),
            "rejected": float(out["rejected"].double().mean()),
            "relative_compute": res.relative_compute,
            "exit_histogram": [int(v) for v in res.exit_histogram],
            "mean_uncertainty": float(out["uncertainty"].double().mean()),
        }
    if bool(in_dist.labeled.any()):
        summary["in_dist"]["accuracy"] = sides["in_dist"]["replay"].accuracy
    return {
        "protocol": "ood_auroc",
        "policy": policy.to_dict(),
        "score": f"normalized {policy.params['measure']} uncertainty at the exit",
        "auroc": auroc(u_id, u_ood),
        "fpr_at_95_tpr": float(fpr95),
        **summary,
        "roc": _thin(roc),
    }

