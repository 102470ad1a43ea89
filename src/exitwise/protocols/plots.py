"""PNG plots of the evaluation protocols in :mod:`exitwise.protocols.measures`.

Each function takes the protocol's JSON-able dict (or ``{name: dict}`` to overlay several
models / recipes) and writes one PNG. matplotlib's Agg canvas is used directly, so the global
backend is never touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError

Result = dict[str, Any]


def _figure(size: tuple[float, float] = (6.0, 4.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), format="png", bbox_inches="tight")
    return out


def _named(results: Result | Mapping[str, Result], protocol: str) -> dict[str, Result]:
    """One result or ``{name: result}`` -> ``{name: result}``, checking the protocol."""
    if "protocol" in results:
        named = {"": results}  # type: ignore[dict-item]
    else:
        named = dict(results)  # type: ignore[arg-type]
    if not named:
        raise InputError("nothing to plot")
    for name, res in named.items():
        if not isinstance(res, Mapping) or res.get("protocol") != protocol:
            raise InputError(f"{name or 'result'} is not a {protocol!r} protocol result")
    return named


def _finish(ax: Any, xlabel: str, ylabel: str, title: str | None, legend: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(fontsize=8, loc="lower right")


def plot_anytime(results: Result | Mapping[str, Result], path_png: str | Path,
                 title: str | None = "Anytime prediction") -> Path:
    """Accuracy of each exit vs its relative compute, one line per result."""
    named = _named(results, "anytime")
    fig, ax = _figure()
    for name, res in named.items():
        xs = [p["relative_compute"] for p in res["points"]]
        ys = [100 * p["accuracy"] for p in res["points"]]
        ax.plot(xs, ys, marker="o", markersize=4, label=name or None)
    _finish(ax, "relative compute (FLOPs / full depth)", "accuracy (%)", title,
            any(named))
    return _save(fig, path_png)


def plot_budgeted_batch(results: Result | Mapping[str, Result], path_png: str | Path,
                        title: str | None = "Budgeted batch classification") -> Path:
    """Test accuracy vs mean test compute across budgets, one line per result."""
    named = _named(results, "budgeted_batch")
    fig, ax = _figure()
    for name, res in named.items():
        pts = sorted(res["points"], key=lambda p: p["relative_compute"])
        ax.plot([p["relative_compute"] for p in pts], [100 * p["accuracy"] for p in pts],
                marker=".", markersize=4, label=name or None)
    _finish(ax, "mean relative compute (FLOPs / full depth)", "accuracy (%)", title,
            any(named))
    return _save(fig, path_png)


def plot_fixed_cost(results: Result | Mapping[str, Result], path_png: str | Path,
                    title: str | None = "Accuracy at fixed cost") -> Path:
    """Accuracy at each budget fraction: static exit (dashed) and budget policy (solid)."""
    named = _named(results, "fixed_cost")
    fig, ax = _figure()
    for name, res in named.items():
        for kind, style in (("budgeted", "-"), ("static", "--")):
            pts = [(r["fraction"], r[kind]["accuracy"]) for r in res["rows"] if r[kind]]
            if pts:
                label = f"{name} {kind}".strip()
                ax.plot([100 * f for f, _ in pts], [100 * a for _, a in pts], style,
                        marker="o", markersize=4, label=label)
    _finish(ax, "budget (% of full-depth FLOPs)", "accuracy (%)", title, True)
    return _save(fig, path_png)


def plot_overthinking(result: Result, path_png: str | Path,
                      title: str | None = "SDN overthinking") -> Path:
    """Per-exit accuracy and where rows are first right, with the overthinking numbers."""
    named = _named(result, "overthinking")
    if len(named) != 1:
        raise InputError("plot_overthinking takes one overthinking result")
    res = next(iter(named.values()))
    fig, ax = _figure()
    e = len(res["per_exit_accuracy"])
    ax.bar(range(e), [100 * v for v in res["earliest_correct"][:e]], color="tab:blue",
           alpha=0.5, label="first right at this exit (% rows)")
    ax.plot(range(e), [100 * v for v in res["per_exit_accuracy"]], marker="o",
            color="tab:red", label="exit accuracy (%)")
    ax.set_xticks(range(e))
    ax.set_xticklabels([str(d) for d in res["exit_layers"]])
    ax.text(0.02, 0.97, f"wasteful {100 * res['wasteful']:.1f}%\n"
            f"destructive {100 * res['destructive']:.1f}%\n"
            f"oracle {100 * res['oracle_accuracy']:.1f}%",
            transform=ax.transAxes, va="top", fontsize=8)
    _finish(ax, "exit (layer)", "%", title, True)
    return _save(fig, path_png)


def plot_risk_coverage(results: Result | Mapping[str, Result], path_png: str | Path,
                       title: str | None = "Selective classification") -> Path:
    """Risk vs coverage, one line per result."""
    named = _named(results, "selective_classification")
    fig, ax = _figure()
    for name, res in named.items():
        label = f"{name} (AURC {res['aurc']:.3f})".strip()
        ax.plot(res["curve"]["coverage"], [100 * r for r in res["curve"]["risk"]], label=label)
    ax.set_xlim(0, 1)
    _finish(ax, "coverage", "risk (% errors among accepted)", title, True)
    return _save(fig, path_png)


def plot_ood_roc(results: Result | Mapping[str, Result], path_png: str | Path,
                 title: str | None = "OOD detection (window cascade)") -> Path:
    """ROC curve (OOD positive) of the uncertainty at the exit, one line per result."""
    named = _named(results, "ood_auroc")
    fig, ax = _figure((4.8, 4.5))
    for name, res in named.items():
        label = f"{name} AUROC {res['auroc']:.3f}".strip()
        ax.plot(res["roc"]["fpr"], res["roc"]["tpr"], label=label)
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    _finish(ax, "false positive rate (in-distribution flagged)", "true positive rate (OOD)",
            title, True)
    return _save(fig, path_png)
