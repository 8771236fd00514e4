"""The metric a task is judged by, and its direction (standard library only: the report imports it).

Classification is judged by test accuracy (higher is better), causal-LM fine-tuning by held-out
perplexity (lower is better); each task names its metric (``fedlora.runtime.tasks``). The console
line, ``summary.json``, the plots, ``fedlora-report`` and the Hydra return value name it through
these objects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Metric:
    """A per-round test metric: its ``metrics.jsonl`` key, its name in text, and its direction."""

    key: str
    name: str
    short: str  # in report column names: final_<short>_mean
    higher_is_better: bool

    @property
    def validation(self) -> str:
        """This metric's key on the validation split (:func:`validation_key`)."""
        return validation_key(self.key)

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b`` (NaN is never better)."""
        if math.isnan(a):
            return False
        return math.isnan(b) or (a > b if self.higher_is_better else a < b)

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values`` (NaN when there is none that is a number)."""
        found = math.nan
        for value in values:
            if self.better(value, found):
                found = value
        return found


def validation_key(key: str) -> str:
    """The validation split's name for a test metric's key: ``test_accuracy`` -> ``val_accuracy``
    (``data.validation_fraction > 0``; the loop logs, ``summary.json`` and ``fedlora-report --tune`` read it)."""
    return "val_" + key.removeprefix("test_")


ACCURACY = Metric("test_accuracy", "test accuracy", "acc", higher_is_better=True)
PERPLEXITY = Metric("test_perplexity", "test perplexity", "ppl", higher_is_better=False)
#: Every metric a task can be judged by (a task names its own: ``fedlora.runtime.tasks``).
METRICS = (ACCURACY, PERPLEXITY)


def metric_named(key: str) -> Metric:
    """The metric whose ``metrics.jsonl`` key is ``key`` (``ValueError`` for an unknown one)."""
    for metric in METRICS:
        if metric.key == key:
            return metric
    raise ValueError(f"unknown metric {key!r}; known: {[m.key for m in METRICS]}")


def metric_of_run(summary: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> Metric:
    """The metric that judges a run: ``summary.json``'s ``primary_metric``, else the one its records carry.

    A run without either (killed before round 0) is read as classification (accuracy).
    """
    if summary.get("primary_metric"):
        return metric_named(str(summary["primary_metric"]))
    for row in rows:
        for metric in METRICS:
            if metric.key in row:
                return metric
    return ACCURACY
