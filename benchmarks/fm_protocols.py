"""The evaluation protocols of benchmarks/fashion_mnist.py for its best model, from cached
logits: fixed-cost table, selective classification, SDN overthinking, and OOD detection by a
window cascade (Fashion-MNIST test as in-distribution, scikit-learn's bundled 8x8 digits,
upscaled to 28x28, as out-of-distribution), each plotted next to the JSON."""

from __future__ import annotations

from pathlib import Path

import torch

from exitwise.analysis import ExitLogitsCache, collect_exit_logits
from exitwise.calibration import search_accuracy_drop
from exitwise.data import ImageClassificationDataset
from exitwise.data.vision import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from exitwise.policies import get_policy
from exitwise.protocols import (
    fixed_cost_table,
    ood_auroc,
    overthinking_report,
    plot_fixed_cost,
    plot_ood_roc,
    plot_overthinking,
    plot_risk_coverage,
    selective_classification,
)


def digits_as_ood(num: int | None = None) -> ImageClassificationDataset | None:
    """scikit-learn's 1,797 handwritten digits (8x8, 0..16) upscaled to 28x28 uint8, labels
    unknown to the model (-1-free: their own digit labels are kept but never scored)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is optional
        return None
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    images = (x[:, 0].clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.as_tensor(d.target, dtype=torch.long)
    if num is not None:
        images, labels = images[:num], labels[:num]
    # the model's own preprocessing: Fashion-MNIST's statistics, not the digits'
    return ImageClassificationDataset(images, labels, mean=FASHION_MNIST_MEAN,
                                      std=FASHION_MNIST_STD)


def ood_cache(model, run: Path) -> ExitLogitsCache | None:
    path = run / "cache-ood-digits.safetensors"
    ds = digits_as_ood()
    if ds is None:
        return None
    if path.is_file() and ExitLogitsCache.load(path).num_examples == len(ds):
        return ExitLogitsCache.load(path)
    cache = collect_exit_logits(model, ds.batches(256), meta={"split": "ood-digits"})
    cache.save(path)
    return cache


def run_protocols(model, run: Path, held_c, test_c, policy, out_stem: Path,
                  max_drop_points: float) -> dict:
    """All protocols for one model; ``policy`` is its calibrated best policy."""
    temps = model.temperatures
    out = {
        "fixed_cost": fixed_cost_table(held_c, test_c, temperatures=temps),
        "selective_classification": selective_classification(
            test_c, policy, temps, heldout=held_c),
        "overthinking": overthinking_report(test_c),
    }
    # The window cascade: its lower edge calibrated like every policy (held-out, accuracy
    # target); no upper edge (nothing rejected), so OOD is scored by uncertainty at the exit.
    window = search_accuracy_drop(get_policy("window", low=0.2, high=1.0), held_c, temps,
                                  max_drop_points=max_drop_points).policy
    ood = ood_cache(model, run)
    if ood is not None:
        out["ood_auroc"] = {"ood_data": "scikit-learn digits, 8x8 upscaled to 28x28",
                            "window_policy": window.to_dict(),
                            **ood_auroc(window, test_c, ood, temps)}
    pngs = {
        "fixed_cost": plot_fixed_cost(out["fixed_cost"], f"{out_stem}_fixed_cost.png"),
        "risk_coverage": plot_risk_coverage(out["selective_classification"],
                                            f"{out_stem}_risk_coverage.png"),
        "overthinking": plot_overthinking(out["overthinking"], f"{out_stem}_overthinking.png"),
    }
    if "ood_auroc" in out:
        pngs["ood_roc"] = plot_ood_roc(out["ood_auroc"], f"{out_stem}_ood_roc.png")
    out["plots"] = {k: Path(v).name for k, v in pngs.items()}
    return out
