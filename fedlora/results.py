"""Run outputs: metrics.jsonl, summary.json, TensorBoard/W&B streams and the PNG plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class RunRecorder:
    """Append one JSON record per round and stream the scalars to TensorBoard (and W&B)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb and wandb.get("enabled"):
            import wandb as wb  # noqa: PLC0415 - optional; main checks it is installed

            self._wandb = wb.init(project=wandb.get("project", "fedlora"), mode=wandb.get("mode", "offline"),
                                  dir=str(self.run_dir), config=dict(config or {}), reinit=True)

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` (one round) and its top-level scalars."""
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        step = int(record["round"])
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "round"}
        scalars.update({f"strategy/{k}": v for k, v in record.get("strategy", {}).items()})
        if self._tb is not None:
            for key, value in scalars.items():
                if isinstance(value, float) and math.isnan(value):
                    continue
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close the streams."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Return the per-round records of a run."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, title: str = "") -> Path:
    """Plot test accuracy and test/train loss against rounds into ``run_dir/curves.png``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(run_dir)
    rounds = [r["round"] for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(rounds, [r["test_accuracy"] for r in rows], marker="o")
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="accuracy", ylim=(0, 1))
    ax_loss.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="test loss")
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        ax_loss.plot(*zip(*train, strict=True), marker="s", label="train loss (clients)")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
