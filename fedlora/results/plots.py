"""The run's own plot: the task's metric and the losses against rounds (``curves.png``), and where the
rounds put the adapter's update: the share of its energy in each rank slot (the rank-collapse diagnostic)."""

from __future__ import annotations

from pathlib import Path

from fedlora.core.metrics import ACCURACY, Metric
from fedlora.results.record import read_records


def plot_run(run_dir: Path, title: str = "", metric: Metric = ACCURACY) -> Path:
    """Plot the task's metric and test/train loss against rounds into ``run_dir/curves.png``; a third
    panel shows each round's update energy per rank slot when the records have it."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = read_records(run_dir)
    rounds = [r.round for r in records]
    slots = [(r.round, r.slot_energy) for r in records if r.slot_energy]
    fig, axes = plt.subplots(1, 3 if slots else 2, figsize=(15 if slots else 10, 4))
    ax_acc, ax_loss = axes[0], axes[1]
    ax_acc.plot(rounds, [r.metric(metric.key) for r in records], marker="o", label="global model, test set")
    own = [(r.round, r.client_eval) for r in records if r.client_eval is not None and r.client_eval.worst is not None]
    if own:  # data.client_test_fraction > 0: each client's own held-out examples
        ax_acc.plot([rnd for rnd, _ in own], [e.mean.get(metric.key) for _, e in own], marker="^", linestyle="--",
                    label="clients' own data: mean")
        ax_acc.plot([rnd for rnd, _ in own], [e.worst for _, e in own], marker="v", linestyle=":",
                    label="clients' own data: worst client")
        ax_acc.legend()
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
    if slots:
        _plot_slots(axes[2], slots)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_slots(ax, slots: list[tuple[int, list[float]]]) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Heatmap: rounds down, rank slots across, colour = the slot's share of the round's update energy."""
    import numpy as np  # noqa: PLC0415

    width = max(len(s) for _, s in slots)
    grid = np.full((len(slots), width), np.nan)
    for i, (_, shares) in enumerate(slots):
        grid[i, : len(shares)] = shares
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest",
                      extent=(-0.5, width - 0.5, len(slots) - 0.5, -0.5))
    ax.set_yticks(range(len(slots)), [str(r) for r, _ in slots])
    ax.set(xlabel="rank slot", ylabel="round", title="share of the update's energy per rank slot")
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
