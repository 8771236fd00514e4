"""The summary of a finished run (``summary.json``): its final and best metric and what it cost."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.core.metrics import Metric

SUMMARY_FILE = "summary.json"


def final_metrics(metric: Metric, last: Mapping[str, Any], best: float) -> dict[str, Any]:
    """The summary's metric entries: ``final_<metric>``, ``best_<metric>``, ``final_test_loss``.

    ``primary_metric`` names the task's metric (``test_accuracy`` or ``test_perplexity``) for
    readers such as ``fedlora-report`` and the Hydra return value.
    """
    value, loss = float(last[metric.key]), float(last["test_loss"])
    out: dict[str, Any] = {f"final_{metric.key}": value, "final_test_loss": loss, f"best_{metric.key}": best,
                           "primary_metric": metric.key}
    validation = metric.validation
    if validation in last:  # data.validation_fraction > 0: what a choice of settings may look at
        out[f"final_{validation}"] = float(last[validation])
    if math.isnan(value) or math.isnan(loss):
        out["warning"] = "final metrics are NaN"
    return out


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (keys sorted) and return its path."""
    path = Path(run_dir) / SUMMARY_FILE
    path.write_text(json.dumps(dict(summary), indent=2, sort_keys=True))
    return path
