"""The run's own plot: the task's metric and the losses against rounds (``curves.png``)."""

from __future__ import annotations

from pathlib import Path

from fedlora.core.metrics import ACCURACY, Metric
from fedlora.results.record import read_records


def plot_run(run_dir: Path, title: str = "", metric: Metric = ACCURACY) -> Path:
    """Plot the task's metric and test/train loss against rounds into ``run_dir/curves.png``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = read_records(run_dir)
    rounds = [r.round for r in records]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(rounds, [r.metric(metric.key) for r in records], marker="o")
    if metric.higher_is_better:  # accuracy, in [0, 1]
        ax_acc.set(xlabel="round", ylabel=metric.name, title=metric.name.removeprefix("test "), ylim=(0, 1))
    else:  # perplexity: falls by orders of magnitude early on
        ax_acc.set(xlabel="round", ylabel=metric.name, title=metric.name.removeprefix("test "), yscale="log")
    ax_loss.plot(rounds, [r.metric("test_loss") for r in records], marker="o", label="test loss")
    train = [(r.round, r.train_loss) for r in records if r.train_loss is not None]
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
