"""Stream a run's round records: ``metrics.jsonl``, TensorBoard and (optionally) Weights & Biases."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.results.record import METRICS_FILE, RoundRecord


class RunRecorder:
    """Append one JSON record per round and stream the scalars to TensorBoard (and W&B)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb and wandb.get("enabled"):
            import wandb as wb  # noqa: PLC0415 - optional; the config check makes sure it is installed

            self._wandb = wb.init(project=wandb.get("project", "fedlora"), mode=wandb.get("mode", "offline"),
                                  dir=str(self.run_dir), config=dict(config or {}), reinit=True)

    def log_round(self, record: RoundRecord) -> None:
        """Write ``record`` (one round) and its top-level scalars."""
        row = record.to_dict()
        with self.path.open("a") as f:
            f.write(record.to_json() + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "round"}
        scalars.update({f"strategy/{k}": v for k, v in (record.strategy or {}).items()})
        if record.client_eval is not None:  # every client's evaluation of the global model on its own data
            scalars.update({f"clients/mean_{k}": v for k, v in record.client_eval.mean.items()})
            if record.client_eval.worst is not None:
                scalars["clients/worst"] = record.client_eval.worst
        if self._tb is not None:
            for key, value in scalars.items():
                if isinstance(value, float) and math.isnan(value):
                    continue
                self._tb.add_scalar(key, value, record.round)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record.round)

    def close(self) -> None:
        """Flush and close the streams."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
