"""Run outputs: metrics.jsonl, summary.json, TensorBoard/W&B streams, the PNG plot, generations."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.core.metrics import ACCURACY, Metric

GENERATIONS = "generations.jsonl"
GENERATIONS_MD = "generations.md"


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


def plot_run(run_dir: Path, title: str = "", metric: Metric = ACCURACY) -> Path:
    """Plot the task's metric and test/train loss against rounds into ``run_dir/curves.png``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = read_metrics(run_dir)
    rounds = [r["round"] for r in rows]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(rounds, [r[metric.key] for r in rows], marker="o")
    if metric == ACCURACY:
        ax_acc.set(xlabel="round", ylabel="test accuracy", title="accuracy", ylim=(0, 1))
    else:  # perplexity: falls by orders of magnitude early on
        ax_acc.set(xlabel="round", ylabel=metric.name, title=metric.name.removeprefix("test "), yscale="log")
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


def final_metrics(metric: Metric, last: Mapping[str, Any], best: float) -> dict[str, Any]:
    """The summary's metric entries: ``final_<metric>``, ``best_<metric>``, ``final_test_loss``.

    ``primary_metric`` names the task's metric (``test_accuracy`` or ``test_perplexity``) for
    readers such as ``fedlora-report`` and the Hydra return value.
    """
    value, loss = float(last[metric.key]), float(last["test_loss"])
    out: dict[str, Any] = {f"final_{metric.key}": value, "final_test_loss": loss, f"best_{metric.key}": best,
                           "primary_metric": metric.key}
    if math.isnan(value) or math.isnan(loss):
        out["warning"] = "final metrics are NaN"
    return out


def evaluate_round(ws: Any, batch_size: int, run_dir: Path, server_round: int) -> dict[str, float]:
    """The task's metrics of the workspace's active model (``ws``: a ``Workspace``); its generations
    of the fixed held-out prompts (causal LM; none for classification) go to the run directory."""
    metrics = ws.evaluate(batch_size)
    generations = ws.generate()
    if generations:
        log_generations(run_dir, server_round, generations)
    return metrics


def log_generations(run_dir: Path, server_round: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append one round's generations to ``generations.jsonl`` and rewrite ``generations.md``."""
    path = Path(run_dir) / GENERATIONS
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"round": server_round, **row}, sort_keys=True) + "\n")
    _write_generations_md(Path(run_dir))


def truncate_generations(run_dir: Path, last_round: int) -> None:
    """Keep the generations of rounds ``<= last_round`` (a resumed run redoes the later ones)."""
    path = Path(run_dir) / GENERATIONS
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(x + "\n" for x in rows if json.loads(x)["round"] <= last_round))
    _write_generations_md(Path(run_dir))


def read_generations(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``generations.jsonl`` (round, example, category, prompt, reference, output)."""
    path = Path(run_dir) / GENERATIONS
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _cell(text: str) -> str:
    """Text inside a Markdown table cell: pipes escaped, line breaks and control bytes made visible."""
    if not text.strip():
        return "*(empty)*"
    text = "".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text)
    return text.replace("|", "\\|").replace("\n", "<br>")


def _write_generations_md(run_dir: Path) -> None:
    """One section per held-out prompt: the prompt, the reference, and the output of every round."""
    by_example: dict[int, list[dict[str, Any]]] = {}
    for row in read_generations(run_dir):
        by_example.setdefault(int(row["example"]), []).append(row)
    parts = ["# Generations", "", "Greedy completions of fixed held-out prompts by the global model after "
             "each round (round 0: before training). Written by fedlora; the data are in "
             "generations.jsonl.", ""]
    for example, rows in by_example.items():
        first = rows[0]
        category = f" ({first['category']})" if first.get("category") else ""
        parts += [f"## Example {example}{category}", "", "```", first["prompt"].rstrip("\n"), "```", "",
                  f"Reference: {_cell(first['reference'])}", "", "| round | output |", "|---|---|"]
        parts += [f"| {r['round']} | {_cell(r['output'])} |" for r in sorted(rows, key=lambda r: r["round"])]
        parts.append("")
    (run_dir / GENERATIONS_MD).write_text("\n".join(parts))
