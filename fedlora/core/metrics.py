"""The metric a task is judged by, and its direction (standard library only: the report imports it).

Classification is judged by test accuracy (higher is better), causal-LM fine-tuning by held-out
perplexity (lower is better). The console line, ``summary.json``, the plots, ``fedlora-report`` and
the Hydra return value all name the task's metric through this one table.
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


ACCURACY = Metric("test_accuracy", "test accuracy", "acc", higher_is_better=True)
PERPLEXITY = Metric("test_perplexity", "test perplexity", "ppl", higher_is_better=False)
TASK_METRICS = {"classification": ACCURACY, "causal_lm": PERPLEXITY}


def task_kind(config: Mapping[str, Any]) -> str:
    """The ``task.kind`` of a resolved config (runs made before tasks existed are classification)."""
    return str((config.get("task") or {}).get("kind", "classification"))


def metric_of(config: Mapping[str, Any]) -> Metric:
    """The metric that judges runs of ``config``."""
    return TASK_METRICS.get(task_kind(config), ACCURACY)
