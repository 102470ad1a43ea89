"""Aligned text tables of the calibrate / evaluate / bench reports, for people to read.

The reports themselves (dicts, written as JSON) stay the machine-readable record; these only
render them. Scores are percentages for accuracy and Pearson's r x 100 for regression, so a
"point" means the same in both.
"""

from __future__ import annotations

from typing import Any, Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell; ``right[i]`` aligns column i to the right."""
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if right[i] else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _pts(x: float | None) -> str:
    return "" if x is None else f"{x:+.2f}"


def _setting(policy: dict[str, Any]) -> str:
    params = {k: v for k, v in policy.items() if k != "name"}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def format_calibration(report: dict[str, Any]) -> str:
    """One row per policy: its setting, held-out score, drop and (when certified) the bound."""
    metric = "pearson x100" if report.get("task") == "regression" else "accuracy %"
    rows = []
    for key, entry in report["policies"].items():
        held = entry["heldout"]
        bound = held.get("certified_bound_points")
        rows.append([
            key, _setting(entry["policy"]), _pct(held.get("score", held.get("accuracy"))),
            _pts(-held["accuracy_drop_points"]) if "accuracy_drop_points" in held else "",
            "" if bound is None else f"<= {bound:.2f}",
            f"{held['mean_layers']:.2f}", f"{held['flops_speedup']:.2f}x",
            "yes" if held.get("met_target") else "NO",
        ])
    delta = report.get("delta")
    head = ["policy", "setting", f"held-out {metric}", "delta (pts)",
            f"certified drop (pts, delta={delta})" if delta else "certified drop",
            "mean layers", "FLOPs speed-up", "target met"]
    text = table(head, rows, [False, False, True, True, True, True, True, False])
    intro = f"calibrated on {report['heldout_rows']} held-out training rows"
    notes = "".join(f"\nnote: {n}" for n in report.get("notes", []))
    return f"{intro}\n{text}{notes}"


def format_evaluation(report: dict[str, Any]) -> str:
    """Per-exit scores (dead exits flagged), then every calibrated policy replayed."""
    reg = report.get("task") == "regression"
    unit = "pearson x100" if reg else "accuracy %"
    dead = set(report.get("dead_exits", []))
    exits = table(
        ["exit layer", unit, ""],
        [[d, _pct(a), "dead: no better than a constant prediction" if d in dead else ""]
         for d, a in zip(report["exit_layers"], report["per_exit_accuracy"])],
        [True, True, False],
    )
    lines = [f"{report['split']}: {report['rows']} rows ({report.get('columns', '')})", exits]
    if reg and "full" in report:
        f = report["full"]
        lines.append(f"full depth: pearson {f['pearson']:.4f}, spearman {f['spearman']:.4f}, "
                     f"mse {f['mse']:.4f}")
    if not reg and "overthinking" in report:
        o = report["overthinking"]
        lines.append(f"majority class {_pct(report['constant_baseline'])}%; oracle "
                     f"{_pct(o['oracle_accuracy'])}%, destructive {_pct(o['destructive'])}%")
    if report.get("policies"):
        rows = [[k, _pct(p["accuracy"]), _pts(p["delta_points"]), f"{p['mean_layers']:.2f}",
                 f"{p['flops_speedup']:.2f}x"] for k, p in report["policies"].items()]
        lines.append(table(["policy", unit, "delta (pts)", "mean layers", "FLOPs speed-up"],
                           rows, [False, True, True, True, True]))
    if report.get("files"):
        lines.append("files: " + ", ".join(report["files"]))
    return "\n".join(lines)


def format_bench(report: dict[str, Any]) -> str:
    """One row per policy: score and delta from the real executor, mean layers, FLOPs
    speed-up and the measured wall-clock speed-up at each batch size."""
    sizes = list(report["batch_sizes"])
    reg = report.get("task") == "regression"
    unit = "pearson x100" if reg else "accuracy %"
    first = report["batch_sizes"][sizes[0]]["policies"]
    rows = []
    for name, p in first.items():
        rows.append([name, _pct(p["accuracy"]), _pts(p["delta_points"]),
                     f"{p['mean_layers']:.2f}", f"{p['flops_speedup']:.2f}x"]
                    + [f"{report['batch_sizes'][b]['policies'][name]['speedup']:.2f}x"
                       for b in sizes])
    head = ["policy", unit, "delta (pts)", "mean layers", "FLOPs speed-up"] + [
        f"measured, batch {b}" for b in sizes]
    m = report.get("machine", {})
    foot = (f"full depth {unit} {_pct(report.get('full_accuracy'))} on {report['rows']} "
            f"{report['split']} rows; wall-clock vs the same model at full depth, median of "
            f"{report['repeats']}, {report['threads']} threads, {m.get('cpu', 'cpu?')}")
    return table(head, rows, [False] + [True] * (len(head) - 1)) + "\n" + foot
