"""Calibration on a held-out exit-logits cache: per-exit temperature scaling and threshold
search to a target (accuracy drop or compute budget) for any registered policy.

    cache = collect_exit_logits(model, heldout_loader)          # held-out, never the eval split
    apply_temperatures(model, fit_temperatures(cache))
    result = search_accuracy_drop("entropy", cache, model.temperatures, max_drop_points=1.0)
    store_calibration(model, "entropy@1pt", result)             # saved with the model
"""

from .conformal import calibrate_cats, conformal_threshold
from .ltt import CalibrationRefused, LTTResult, certify_threshold, early_exit_losses
from .temperature import (
    apply_temperatures,
    calibration_report,
    expected_calibration_error,
    fit_temperatures,
)
from .thresholds import (
    CalibrationResult,
    drop_stale_calibrations,
    full_depth_accuracy,
    search_accuracy_drop,
    search_budget,
    store_calibration,
)

__all__ = [
    "calibrate_cats",
    "conformal_threshold",
    "CalibrationRefused",
    "LTTResult",
    "certify_threshold",
    "early_exit_losses",
    "CalibrationResult",
    "drop_stale_calibrations",
    "apply_temperatures",
    "calibration_report",
    "expected_calibration_error",
    "fit_temperatures",
    "full_depth_accuracy",
    "search_accuracy_drop",
    "search_budget",
    "store_calibration",
]
