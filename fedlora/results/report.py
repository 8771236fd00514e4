"""Compare the runs of a sweep: one row per method, a Markdown/CSV table and a two-panel plot.

    fedlora-report runs/sweep_2026-11-24_09-00-00           # writes report.md/.csv/.png there
    fedlora-report runs/2026-11-24_08-26-40_fedavg --out /tmp/rep

A *run dir* is a directory holding ``metrics.jsonl`` (one JSON record per round), usually with
``config.yaml`` and ``summary.json`` next to it; ``FAILED`` marks a job that raised. ``path`` may be
a run dir, a Hydra sweep dir (one run dir per job) or any folder above them. Failed and
incomplete jobs never enter the table but are listed in the report.

Besides the final metric, two budget protocols: *cost to target* (rounds and bytes, up and down, until
a target is reached; ``--target``) and *quality under a budget* (the metric of the last round whose
traffic so far fits a byte budget; ``--budget-mb``, by default what the cheapest communicating method
spent over its whole run).

The table follows the runs' task: test accuracy for classification (higher is better),
held-out perplexity for causal-LM fine-tuning (lower is better; "rounds to target" then counts the
rounds to reach ``best / 0.9``).

This module imports no flwr, hydra or torch so that the command starts quickly; matplotlib is
imported only to draw the plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedlora.core.metrics import ACCURACY, Metric, metric_of_run, validation_key
from fedlora.results.record import METRICS_FILE, RoundRecord, read_rows

#: Share of the best final accuracy that "rounds to target" measures (perplexity: best / share).
TARGET_SHARE = 0.9
#: How many last rounds the "last rounds" column averages: on a hard preset one round's test accuracy moves
#: by several points, so the final round alone ranks methods by noise as much as by quality.
TAIL_ROUNDS = 3


def columns(metric: Metric = ACCURACY) -> list[str]:
    """The columns of ``report.csv`` (the keys of a :func:`summarize` row) for runs judged by ``metric``."""
    s = metric.short
    return ["method", "n_seeds", f"final_{s}_mean", f"final_{s}_std", f"tail_{s}_mean", f"tail_{s}_std",
            f"best_{s}_mean", f"client_{s}_mean",
            f"client_{s}_worst", "target",
            "rounds_to_target", "seeds_reached_target", "up_bytes_to_target", "down_bytes_to_target",
            "budget_bytes", f"{s}_at_budget_mean", "rounds_in_budget", "up_bytes_per_round",
            "down_bytes_per_round", "up_compression_ratio", "down_compression_ratio", "wall_time_s",
            "failed_clients", "epsilon", "personalized"]


#: The columns for classification runs.
COLUMNS = columns(ACCURACY)
#: Config keys that legitimately differ between the runs of one method.
_PER_JOB_KEYS = {"seed", "name", "output_dir"}


@dataclass
class Run:
    """One job of a sweep.

    Attributes
    ----------
    path : Path
        The run directory.
    config : dict
        The resolved config (``config.yaml``; ``.hydra/config.yaml`` when a job failed before
        writing it; ``{}`` when neither exists).
    rows : list of RoundRecord
        The per-round records of ``metrics.jsonl``, round 0 first.
    summary : dict
        ``summary.json`` (``{}`` when absent).
    method : str
        Strategy short name plus compression, e.g. ``"flora+compeft(d=0.1)"``; ``"?"`` if unknown.
    strategy : str
        Strategy short name alone, e.g. ``"flora"`` (the uncompressed baseline of ``method``).
    status : str
        ``"ok"``, ``"failed"`` (a ``FAILED`` file), ``"incomplete"`` (no summary, or no metrics)
        or ``"unreadable"`` (a file could not be parsed).
    error : str
        One line saying why the run is not ``"ok"``.
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    rows: list[RoundRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    method: str = "?"
    strategy: str = "?"
    status: str = "ok"
    error: str = ""

    @property
    def seed(self) -> Any:
        """The config's ``seed`` (``None`` when unknown)."""
        return self.config.get("seed")

    @property
    def ok(self) -> bool:
        """Whether the run completed and enters the table."""
        return self.status == "ok"

    @property
    def metric(self) -> Metric:
        """The metric that judges the run (its task's)."""
        return metric_of_run(self.summary, (r.metrics for r in self.rows))


# ----------------------------------------------------------------------------------------- loading


def find_run_dirs(path: Path) -> list[Path]:
    """Return every job directory under ``path`` (``path`` included), sorted.

    Parameters
    ----------
    path : Path
        A run dir, a sweep dir or a folder above them.

    Returns
    -------
    list of Path
        Directories holding ``metrics.jsonl`` or ``FAILED``, or Hydra job dirs (``.hydra/``) that
        have neither (jobs killed before their first round). A run's own ``checkpoint/`` (which
        keeps a copy of ``metrics.jsonl``) is part of that run, not a job.
    """
    path = Path(path)
    found = {p.parent for name in ("metrics.jsonl", "FAILED") for p in path.rglob(name) if p.is_file()}
    found |= {p.parent for p in path.rglob(".hydra") if p.is_dir()}
    # a run's checkpoint/round_<t>/ holds a copy of metrics.jsonl: part of that run, not a run
    found = {p for p in found if not any(a.name == "checkpoint" and a.parent in found for a in p.parents)}
    return sorted(found, key=lambda p: [_natural_key(part) for part in p.relative_to(path).parts])


def _natural_key(name: str) -> list[Any]:
    """Sort ``10_x`` after ``9_x`` (Hydra numbers its jobs)."""
    head, _, tail = name.partition("_")
    return [int(head), tail] if head.isdigit() else [math.inf, name]


def load_run(run_dir: Path) -> Run:
    """Read one run directory into a :class:`Run` (never raises for a broken job).

    Parameters
    ----------
    run_dir : Path
        The job directory.

    Returns
    -------
    Run
        With ``status`` telling whether it can be compared.
    """
    run = Run(path=Path(run_dir))
    try:
        run.config = _read_config(run.path)
        run.strategy, run.method = method_label(run.config)
        if (run.path / METRICS_FILE).is_file():
            run.rows = [RoundRecord.from_dict(row) for row in read_rows(run.path / METRICS_FILE)]
        if (run.path / "summary.json").is_file():
            run.summary = json.loads((run.path / "summary.json").read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        run.status, run.error = "unreadable", f"{type(exc).__name__}: {exc}"
        return run
    if (run.path / "FAILED").is_file():
        run.status, run.error = "failed", _failure_line((run.path / "FAILED").read_text(errors="replace"))
    elif not run.rows:
        run.status, run.error = "incomplete", "no metrics.jsonl records (killed before round 0?)"
    elif not run.summary:
        last = run.rows[-1].round
        again = ("a deployed run cannot be resumed: run it again" if run.config.get("deployment")
                 else f"`fedlora resume={run.path}`")
        run.status, run.error = "incomplete", f"no summary.json after round {last} (still running, or killed: {again})"
    return run


def load_runs(path: Path | str | Sequence[Path | str]) -> list[Run]:
    """Load every job under ``path``.

    Parameters
    ----------
    path : Path, str, or a sequence of them
        A run dir, a sweep dir or a folder above them; several gather their jobs into one report (a job
        found under two of them counts once).

    Returns
    -------
    list of Run
        All jobs, failed and incomplete ones included (see ``Run.status``); empty if none.
    """
    paths = [Path(path)] if isinstance(path, str | Path) else [Path(p) for p in path]
    dirs = {d.resolve(): d for p in paths for d in find_run_dirs(p)}  # the first spelling of a shared job
    return split_method_settings([load_run(d) for d in dirs.values()])


# the config groups whose settings make a method (a sweep of strategy.reg_weight compares two methods)
_METHOD_GROUPS = ("strategy", "compression", "downlink")


def split_method_settings(runs: list[Run]) -> list[Run]:
    """Tell apart runs of one method label whose method settings differ: each gets them in its label.

    Runs that share a label (``hetlora``) but differ in a setting of the strategy, the compressor or the
    downlink (``strategy.reg_weight`` 0.01 and 1, ``compression.alpha`` 1 and 4) are different methods,
    never seeds of one: their labels become ``hetlora [strategy.reg_weight=0.01]`` and ``... =1``. A run that
    lacks the key (a setting added after it ran) keeps its label; differences elsewhere (``num_rounds``) stay
    one method and the report notes them (:func:`problem_lines`).

    >>> def run(alpha):
    ...     return Run(path=Path("x"), config={"compression": {"alpha": alpha}}, method="m")
    >>> [r.method for r in split_method_settings([run(1.0), run(4.0), run(1.0)])]
    ['m [compression.alpha=1]', 'm [compression.alpha=4]', 'm [compression.alpha=1]']

    ``2`` and ``2.0`` are one value (one given on the command line as ``2``, the other as ``2.0``):

    >>> [r.method for r in split_method_settings([run(2), run(2.0)])]
    ['m', 'm']
    """
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        if run.status != "unreadable":
            groups.setdefault(run.method, []).append(i)
    out = list(runs)
    for members in groups.values():
        flats = [_flatten({g: runs[i].config.get(g) or {} for g in _METHOD_GROUPS}) for i in members]
        keys = set().union(*flats)
        differing = sorted(k for k in keys if len({_value_key(f[k]) for f in flats if k in f}) > 1)
        for i, flat in zip(members, flats, strict=True):
            settings = ",".join(f"{k}={_shown(flat[k])}" for k in differing if k in flat)
            if settings:
                out[i] = replace(runs[i], method=f"{runs[i].method} [{settings}]")
    return out


def _read_config(run_dir: Path) -> dict[str, Any]:
    for candidate in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


def _failure_line(text: str) -> str:
    """The line of a ``FAILED`` file worth showing: a traceback's last line, else the first."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "FAILED (no message)"
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= 200 else line[:197] + "..."


def compression_name(compression: Mapping[str, Any]) -> str:
    """The ``compression=`` choice a resolved compression config came from (its module's name, but for
    SCAFCOM's class: ``ef21`` without the drift correction, ``scallion`` with random-k).

    >>> compression_name({"_target_": "fedlora.compression.scafcom.SCAFCOM", "drift_correction": False})
    'ef21'
    """
    comp = str(compression.get("_target_", "?")).rsplit(".", 2)
    name = comp[-2] if len(comp) > 1 else comp[0]
    if name == "scafcom" and compression.get("drift_correction") is False:
        return "ef21"  # compression=ef21: SCAFCOM's class without its drift correction
    if name == "scafcom" and compression.get("codec") == "rand_k":
        return "scallion"  # compression=scallion: the same class with unbiased random-k
    return name


def method_label(config: dict[str, Any]) -> tuple[str, str]:
    """Return ``(strategy, method)`` labels of a config.

    Parameters
    ----------
    config : dict
        A resolved run config.

    Returns
    -------
    tuple of str
        The strategy's module name (``strategies.flora.FLoRA`` -> ``"flora"``) and the method,
        that name plus ``"+compeft(d=0.1)"`` when compression is on and ``"+down-compeft(d=0.1)"`` when
        downlink compression is.

    Examples
    --------
    >>> method_label({"strategy": {"_target_": "strategies.flora.FLoRA"},
    ...               "compression": {"_target_": "fedlora.compression.compeft.ComPEFT", "density": 0.1}})
    ('flora', 'flora+compeft(d=0.1)')

    SCAFCOM's class without its drift correction is ``compression=ef21``:

    >>> method_label({"strategy": {"_target_": "strategies.fedavg.FedAvg"}, "compression": {
    ...     "_target_": "fedlora.compression.scafcom.SCAFCOM", "density": 0.1, "drift_correction": False}})
    ('fedavg', 'fedavg+ef21(d=0.1)')

    The centralized bound (``transport: pooled``) is ``"centralized"`` whatever aggregates its learner.
    FedAU's weights (``participation.fedau``) add ``"+fedau"``:

    >>> method_label({"strategy": {"_target_": "strategies.fedavg.FedAvg"}, "participation": {"fedau": True}})
    ('fedavg', 'fedavg+fedau')

    FLoRA's merges truncated by their SVD (``downlink=svd``) add ``"+down-svd(q=<rank>)"``:

    >>> method_label({"strategy": {"_target_": "strategies.flora.FLoRA"},
    ...               "downlink": {"_target_": "fedlora.compression.merges.MergeSVD", "rank": 6}})
    ('flora', 'flora+down-svd(q=6)')
    """
    target = str((config.get("strategy") or {}).get("_target_", "?"))
    strategy = target.rsplit(".", 2)[-2] if target.count(".") >= 1 else target
    if target == "strategies.centralized.Centralized" or config.get("transport") == "pooled":
        strategy = "centralized"  # (the first: runs made before the bound became a transport)
    compression = config.get("compression") or {}
    method = strategy
    if compression.get("_target_"):
        comp_name = compression_name(compression)
        density = compression.get("density")
        suffix = f"(d={density:g})" if isinstance(density, int | float) else ""
        method = f"{strategy}+{comp_name}{suffix}"
    downlink = config.get("downlink") or {}
    if downlink.get("_target_"):
        name = str(downlink["_target_"]).rsplit(".", 2)
        density, rank = downlink.get("density"), downlink.get("rank")
        if name[-2:] == ["merges", "MergeSVD"]:  # downlink=svd: FLoRA's merges truncated to rank q
            method += "+down-svd" + (f"(q={rank})" if isinstance(rank, int) else "")
        else:
            method += f"+down-{name[-2] if len(name) > 1 else name[0]}" + (
                f"(d={density:g})" if isinstance(density, int | float) else "")
    fedau = "+fedau" if (config.get("participation") or {}).get("fedau") is True else ""
    return strategy, method + fedau + privacy_label(config.get("privacy") or {})


def privacy_label(privacy: dict[str, Any]) -> str:
    """``+dp_sgd(eps=3)``, ``+dp_fedavg(z=1,C=0.5)``; empty without privacy (``target_epsilon=inf`` included).

    >>> privacy_label({"kind": "dp_sgd", "target_epsilon": 3.0, "clip": 1.0})
    '+dp_sgd(eps=3)'
    >>> privacy_label({"kind": "dp_sgd", "target_epsilon": float("inf")})
    ''
    >>> privacy_label({"kind": "dp_sgd", "target_epsilon": 3.0, "secure": True})
    '+dp_sgd(eps=3)+secagg'
    """
    kind = privacy.get("kind", "none")
    eps, sigma = privacy.get("target_epsilon"), privacy.get("noise_multiplier")
    secagg = "+secagg" if privacy.get("secure") is True else ""
    if kind == "none" or eps == math.inf:
        return secagg
    budget = (f"eps={eps:g}" if isinstance(eps, int | float) else
              f"z={sigma:g}" if isinstance(sigma, int | float) else "")
    clip = privacy.get("clip")
    if kind == "dp_fedavg" and isinstance(clip, int | float):
        budget += f",C={clip:g}"
    return f"+{kind}({budget}){secagg}"


# --------------------------------------------------------------------------------------- summarize


def per_round_bytes(rows: list[RoundRecord], direction: str) -> float:
    """Mean bytes per training round (all clients), rounds 1.. only.

    Parameters
    ----------
    rows : list of RoundRecord
        A run's ``metrics.jsonl`` records.
    direction : {"up", "down"}
        Uplink (client -> server) or downlink.

    Returns
    -------
    float
        NaN if the run has no training round.
    """
    per_round = [float(r.bytes_total(direction)) for r in rows if r.round >= 1]
    return float(np.mean(per_round)) if per_round else math.nan


def report_metric(runs: list[Run]) -> Metric:
    """The metric of the completed runs' task (accuracy when there is none)."""
    metrics = [r.metric for r in runs if r.ok]
    return metrics[0] if metrics else ACCURACY


def target_value(best: float, metric: Metric = ACCURACY) -> float:
    """What "rounds to target" waits for: ``0.9 * best`` accuracy, or ``best / 0.9`` perplexity."""
    return TARGET_SHARE * best if metric.higher_is_better else best / TARGET_SHARE


def first_round_reaching(rows: list[RoundRecord], target: float, metric: Metric = ACCURACY) -> int | None:
    """The first round whose metric reaches ``target`` (``>=``, or ``<=`` when lower is better)."""
    for row in rows:
        value = row.metric(metric.key)
        if value is not None and (value >= target if metric.higher_is_better else value <= target):
            return row.round
    return None


def cumulative_bytes(rows: list[RoundRecord]) -> list[tuple[int, float, float]]:
    """``(round, up, down)``: the bytes sent up and down from the start of the run through each round."""
    up = down = 0.0
    out = []
    for row in rows:
        up, down = up + row.bytes_total("up"), down + row.bytes_total("down")
        out.append((row.round, up, down))
    return out


def bytes_through(rows: list[RoundRecord], server_round: int) -> tuple[float, float]:
    """The bytes up and down spent from the start of the run through round ``server_round``."""
    for rnd, up, down in cumulative_bytes(rows):
        if rnd == server_round:
            return up, down
    raise ValueError(f"the run has no round {server_round}")


def value_at_budget(rows: list[RoundRecord], budget: float, metric: Metric = ACCURACY) -> tuple[float, int]:
    """The metric of the last round whose cumulative traffic (up + down) is within ``budget`` bytes, and
    that round: the model a user would hold when the budget runs out (never the best round by test
    metric, which would select on the test set). Round 0 costs nothing."""
    value, last = math.nan, 0
    for (rnd, up, down), row in zip(cumulative_bytes(rows), rows, strict=True):
        if up + down > budget:
            break
        value, last = _nan_if_none(row.metric(metric.key)), rnd
    return value, last


def total_bytes(run: Run) -> float:
    """Everything a run sent, up plus down."""
    return sum(r.bytes_total("up") + r.bytes_total("down") for r in run.rows)


def default_budget(groups: dict[str, list[Run]]) -> float:
    """The byte budget methods are compared at unless one is given: what the cheapest method spent over
    its whole run (mean over its seeds), among methods that communicate at all (``centralized`` does
    not). NaN when none does."""
    spent = [float(np.mean([total_bytes(r) for r in group])) for group in groups.values()]
    spent = [s for s in spent if s > 0]
    return min(spent) if spent else math.nan


def final_value(run: Run, metric: Metric = ACCURACY) -> float:
    """``summary.json``'s final metric, else the last round's."""
    value = run.summary.get(f"final_{metric.key}", run.rows[-1].metric(metric.key) if run.rows else None)
    return math.nan if value is None else float(value)


def best_value(run: Run, metric: Metric = ACCURACY) -> float:
    """``summary.json``'s best metric, else the best round's."""
    value = run.summary.get(f"best_{metric.key}")
    if value is None:
        value = metric.best(float(v) for r in run.rows if (v := r.metric(metric.key)) is not None)
    return float(value)


def tail_value(run: Run, metric: Metric = ACCURACY, rounds: int = TAIL_ROUNDS) -> float:
    """The mean of the metric over the run's last ``rounds`` evaluated rounds (all of them when it has fewer;
    round 0, the untrained start, never counts); NaN when no round after 0 has it.

    >>> run = Run(Path("r"), rows=[RoundRecord(i, {"test_accuracy": a}, None, 0.0)
    ...                            for i, a in enumerate([0.1, 0.5, 0.7, 0.8, 0.6])])
    >>> round(tail_value(run), 6)
    0.7
    """
    values = [float(v) for r in run.rows if r.round > 0 and (v := r.metric(metric.key)) is not None]
    return float(np.mean(values[-rounds:])) if values else math.nan


def wall_time(run: Run) -> float:
    """``summary.json``'s wall time in seconds, else the last round's ``wall_time``."""
    value = run.summary.get("wall_time_seconds", run.rows[-1].wall_time if run.rows else None)
    return math.nan if value is None else float(value)


def group_by_method(runs: list[Run]) -> dict[str, list[Run]]:
    """Completed runs grouped by ``method``, methods sorted (``x+compeft`` right after ``x``)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.ok:
            groups.setdefault(run.method, []).append(run)
    return {m: sorted(groups[m], key=lambda r: str(r.seed)) for m in sorted(groups)}


class ChoiceError(ValueError):
    """``--tune`` cannot choose: a run has no validation metric, or no run sets the key."""


def _value_key(value: Any) -> str:
    """What tells config values apart: ``2`` (``server_lr=2`` on the command line) and ``2.0`` are one value.

    >>> _value_key(2) == _value_key(2.0) != _value_key("2") != _value_key(True)
    True
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(float(value))
    return repr(value)


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def choose_on_validation(runs: list[Run], key: str, metric: Metric = ACCURACY,
                         ) -> tuple[list[Run], list[dict[str, Any]]]:
    """For each method, keep only the runs of the value of ``key`` whose final validation metric is best.

    ``key`` is a dotted config key that a sweep varies (``compression.alpha``); the validation metric
    is ``val_<metric>`` of each run's last round (``data.validation_fraction > 0``), averaged over the
    value's seeds; values that tie on it are told apart by the mean final validation loss (lower wins).
    The kept runs are relabelled ``"<method> [<key>=<value>]"``, so the table reports test metrics at
    the setting chosen on validation only, never at the best test value. Runs whose config does not set
    ``key`` (an uncompressed baseline in a sweep of a compressor's setting) and runs that did not
    complete pass through unchanged.

    Returns
    -------
    tuple
        The runs to report, and one entry per tuned method: ``method``, ``chosen``, and
        ``candidates`` (value -> ``(mean validation metric, seeds)``).

    Raises
    ------
    ChoiceError
        When no completed run sets ``key``, or a run to choose among has no validation metric.
    """
    val_key = metric.validation
    kept: list[Run] = [run for run in runs if not run.ok]
    choices: list[dict[str, Any]] = []
    tuned_any = False
    # the method without the tuned key: a key the label shows (compression.density) must not split the choice
    untuned: dict[str, list[Run]] = {}
    for run in runs:
        if not run.ok:
            continue
        if key not in _flatten(run.config):
            kept.append(run)
            continue
        untuned.setdefault(method_label(_without(run.config, key))[1], []).append(run)
    for method, group in sorted(untuned.items()):
        by_value: dict[str, list[Run]] = {}
        for run in group:
            by_value.setdefault(_shown(_flatten(run.config)[key]), []).append(run)
        tuned_any = True
        candidates: dict[str, tuple[float, int]] = {}
        losses: dict[str, float] = {}
        for value, members in by_value.items():
            scores = []
            for run in members:
                score = run.rows[-1].metrics.get(val_key) if run.rows else None
                if score is None:
                    raise ChoiceError(f"--tune {key}: {run.path} has no {val_key}; choosing on validation needs "
                                      "runs with a validation split: rerun the sweep with data.validation_fraction=0.1")
                scores.append(float(score))
            candidates[value] = (float(np.mean(scores)), len(members))
            val_loss = validation_key("test_loss")
            losses[value] = float(np.mean([r.rows[-1].metrics.get(val_loss, math.inf) for r in members]))
        sign = 1.0 if metric.higher_is_better else -1.0
        # a tie on the metric (a few hundred validation examples tie often) goes to the lower validation loss
        chosen = max(candidates, key=lambda v: (sign * candidates[v][0], -losses[v]))
        label = f"{method} [{key}={chosen}]"
        kept += [replace(run, method=label) for run in by_value[chosen]]
        choices.append({"method": method, "label": label, "chosen": chosen, "candidates": candidates,
                        "val_loss": losses})
    if not tuned_any:
        raise ChoiceError(f"--tune {key}: no completed run sets {key}; give a key the sweep varies, "
                          "for example compression.alpha")
    return kept, choices


def paired_differences(runs: list[Run], reference: str, metric: Metric = ACCURACY) -> list[dict[str, Any]]:
    """Each method's difference to ``reference`` seed by seed: the runs of one seed share the partition, the
    ranks and the clients sampled each round, so a paired difference leaves out what the seed moves in both.

    Returns one entry per other method with a seed ``reference`` also ran: ``seeds``, ``final`` and ``tail``
    (the per-seed differences of the final value and of the last :data:`TAIL_ROUNDS` rounds' mean, this method
    minus ``reference``), ``better`` and ``tail_better`` (on how many of those seeds its final value, and its
    last rounds' mean, is better, by ``metric``'s direction) and ``personalized``.

    Raises
    ------
    ChoiceError
        When ``reference`` has no completed run (naming the methods there are).
    """
    groups = group_by_method(runs)
    if reference not in groups:
        raise ChoiceError(f"--paired {reference}: no completed run of that method; the methods are "
                          f"{', '.join(groups) or 'none'}")
    by_seed = {str(r.seed): r for r in groups[reference]}
    out = []
    for method, group in groups.items():
        pairs = [(str(r.seed), r, by_seed[str(r.seed)]) for r in group if str(r.seed) in by_seed]
        if method == reference or not pairs:
            continue
        out.append({
            "method": method, "seeds": [seed for seed, _, _ in pairs],
            "final": [final_value(r, metric) - final_value(q, metric) for _, r, q in pairs],
            "tail": [tail_value(r, metric) - tail_value(q, metric) for _, r, q in pairs],
            "better": sum(metric.better(final_value(r, metric), final_value(q, metric)) for _, r, q in pairs),
            "tail_better": sum(metric.better(tail_value(r, metric), tail_value(q, metric)) for _, r, q in pairs),
            "personalized": any(bool(r.summary.get("personalized")) for r in group),
        })
    return out


def paired_markdown(reference: str, entries: list[dict[str, Any]], metric: Metric = ACCURACY) -> list[str]:
    """The report's section of :func:`paired_differences`."""
    short = metric.short

    def spread(values: list[float]) -> str:  # one seed has no spread to show
        mean = float(np.mean(values))
        return f"{mean:+.3f} ± {float(np.std(values, ddof=1)):.3f}" if len(values) > 1 else f"{mean:+.3f}"

    lines = [f"## Paired by seed against `{reference}`", "",
             f"Each method's {metric.name} minus `{reference}`'s in the run of the same seed (same partition, ranks "
             "and clients sampled each round), then mean ± sample std over the seeds both ran: a mean larger than "
             f"its std is a difference the seeds agree on. Better on: the seeds where its final value (its last "
             f"{TAIL_ROUNDS} rounds' mean) is better; the mean of the last rounds moves less from round to round.",
             "", f"| method | seeds | final {short}, per seed | final {short} | better on | last {TAIL_ROUNDS} rounds' "
             f"{short}, per seed | last {TAIL_ROUNDS} rounds' {short} | better on |", "|---" * 8 + "|"]
    for e in entries:
        mark = " †" if e["personalized"] else ""
        final_seeds, tail_seeds = (", ".join(f"{d:+.3f}" for d in e[k]) for k in ("final", "tail"))
        n = len(e["seeds"])
        lines.append(f"| {e['method']}{mark} | {', '.join(e['seeds'])} | {final_seeds} | {spread(e['final'])} | "
                     f"{e['better']} of {n} | {tail_seeds} | {spread(e['tail'])} | {e['tail_better']} of {n} |")
    if any(e["personalized"] for e in entries):
        lines += ["", "† its values are the mean over clients of their own models on their own data, not the test "
                  "set, so its difference mixes two measures."]
    return [*lines, ""]


def choices_markdown(key: str, choices: list[dict[str, Any]], metric: Metric = ACCURACY) -> list[str]:
    """The report's section that says what was chosen on validation, and among what."""
    name = metric.validation
    lines = [f"## {key} chosen on validation", "",
             f"For each method, the value of `{key}` with the best mean final `{name}` over its seeds (a tie goes "
             "to the lower mean final validation loss, shown in brackets where values tie); the table above gives "
             "the test metrics of that value's runs only (test metrics never chose).", ""]
    for choice in choices:
        scores = [score for score, _ in choice["candidates"].values()]
        losses = choice["val_loss"]
        listed = ", ".join(f"{value}: {score:.4f}"
                           + (f" [val loss {losses[value]:.4f}]" if scores.count(score) > 1 else "")
                           + f" ({n} seed{'s' if n != 1 else ''})"
                           for value, (score, n) in choice["candidates"].items())
        lines.append(f"- {choice['method']}: **{choice['chosen']}** among {listed}")
    return [*lines, ""]


def summarize(runs: list[Run], metric: Metric | None = None, *, target: float | None = None,
              budget: float | None = None) -> list[dict[str, Any]]:
    """One row per method over its completed runs (failed/incomplete runs are left out).

    Parameters
    ----------
    runs : list of Run
        From :func:`load_runs`.
    metric : Metric, optional
        What judges the runs; by default their task's (:func:`report_metric`).
    target : float, optional
        The metric value "cost to target" waits for; by default ``0.9 *`` the best final-accuracy
        mean of all methods (perplexity: the lowest mean ``/ 0.9``).
    budget : float, optional
        The bytes (up plus down, whole run) "quality under a budget" allows; by default
        :func:`default_budget`.

    Returns
    -------
    list of dict
        Keys :func:`columns` (:data:`COLUMNS` for accuracy): ``final_acc_std`` is the sample std
        (0 with one seed); ``rounds_to_target`` the mean over the seeds that reached ``target``
        (``"never"`` if none did; ``seeds_reached_target`` says how many), ``up_bytes_to_target`` and
        ``down_bytes_to_target`` the bytes those seeds spent through that round (mean; NaN if none);
        ``acc_at_budget_mean`` the metric of the last round within ``budget`` (mean over seeds) and
        ``rounds_in_budget`` how many rounds fit (mean);
        bytes per round are summed over clients; ``up_compression_ratio`` and ``down_compression_ratio``
        are the uncompressed method's bytes over this one's, each direction (``None`` for the
        uncompressed method itself, or without it among the runs);
        ``failed_clients`` sums failed client replies over all rounds and seeds.
    """
    metric = metric or report_metric(runs)
    groups = group_by_method(runs)
    rows = [_method_row(method, group, metric) for method, group in groups.items()]
    target = target_value(best_final_mean(rows, metric), metric) if target is None else float(target)
    budget = default_budget(groups) if budget is None else float(budget)
    for row, group in zip(rows, groups.values(), strict=True):
        reached = [(r, first_round_reaching(r.rows, target, metric)) for r in group] \
            if math.isfinite(target) else []
        spent = [bytes_through(r.rows, rnd) for r, rnd in reached if rnd is not None]
        rounds = [rnd for _, rnd in reached if rnd is not None]
        row["target"] = target
        row["rounds_to_target"] = float(np.mean(rounds)) if rounds else "never"
        row["seeds_reached_target"] = len(rounds)
        row["up_bytes_to_target"] = float(np.mean([up for up, _ in spent])) if spent else math.nan
        row["down_bytes_to_target"] = float(np.mean([down for _, down in spent])) if spent else math.nan
        at_budget = [value_at_budget(r.rows, budget, metric) for r in group] if math.isfinite(budget) else []
        row["budget_bytes"] = budget
        row[f"{metric.short}_at_budget_mean"] = float(np.mean([v for v, _ in at_budget])) if at_budget else math.nan
        row["rounds_in_budget"] = float(np.mean([rnd for _, rnd in at_budget])) if at_budget else math.nan
    by_method = {row["method"]: row for row in rows}
    for row, group in zip(rows, groups.values(), strict=True):
        plain = by_method.get(group[0].strategy) if row["method"] != group[0].strategy else None
        for way in ("up", "down"):
            base, sent = (plain or {}).get(f"{way}_bytes_per_round"), row[f"{way}_bytes_per_round"]
            row[f"{way}_compression_ratio"] = (base / sent if base and sent and math.isfinite(base / sent)
                                               else None)
    return [{key: row[key] for key in columns(metric)} for row in rows]


def _method_row(method: str, group: list[Run], metric: Metric) -> dict[str, Any]:
    finals = np.array([final_value(r, metric) for r in group])
    tails = [tail_value(r, metric) for r in group]
    s = metric.short
    return {
        "method": method,
        "n_seeds": len(group),
        f"final_{s}_mean": float(np.mean(finals)),
        f"final_{s}_std": float(np.std(finals, ddof=1)) if len(group) > 1 else 0.0,
        # the mean of each run's last TAIL_ROUNDS rounds, then mean and sample std over seeds
        f"tail_{s}_mean": _mean_or_nan(tails),
        f"tail_{s}_std": float(np.std(tails, ddof=1)) if len(group) > 1 else 0.0,
        f"best_{s}_mean": float(np.mean([best_value(r, metric) for r in group])),
        # per-client evaluation after the last round (data.client_test_fraction > 0), mean over seeds; nan without
        f"client_{s}_mean": _mean_or_nan([client_value(r, metric, "mean") for r in group]),
        f"client_{s}_worst": _mean_or_nan([client_value(r, metric, "worst") for r in group]),
        "up_bytes_per_round": float(np.mean([per_round_bytes(r.rows, "up") for r in group])),
        "down_bytes_per_round": float(np.mean([per_round_bytes(r.rows, "down") for r in group])),
        "wall_time_s": float(np.mean([wall_time(r) for r in group])),
        "failed_clients": int(sum(row.count("failed") for r in group for row in r.rows)),
        # the largest epsilon any client spent (summary.json's dp_epsilon), mean over seeds; nan without privacy
        "epsilon": float(np.mean([float(r.summary.get("dp_epsilon", math.nan)) for r in group])),
        # no global model (FedSA-LoRA): its final and best values are the mean over clients of their own models
        "personalized": any(bool(r.summary.get("personalized")) for r in group),
    }


def client_value(run: Run, metric: Metric, which: str) -> float:
    """The last round's per-client evaluation of ``run``: the mean over its clients (``which="mean"``) or the
    worst client's value (``"worst"``); NaN when its clients did not evaluate (``data.client_test_fraction=0``)."""
    evaluation = run.rows[-1].client_eval if run.rows else None
    if evaluation is None:
        return math.nan
    value = evaluation.mean.get(metric.key) if which == "mean" else evaluation.worst
    return math.nan if value is None else float(value)


def _mean_or_nan(values: list[float]) -> float:
    """The mean of ``values`` when every one is a number, else NaN (a method whose seeds did not all evaluate)."""
    return float(np.mean(values)) if values and all(math.isfinite(v) for v in values) else math.nan


def best_final_mean(rows: list[dict[str, Any]], metric: Metric = ACCURACY) -> float:
    """The best ``final_<metric>_mean`` of the rows, ignoring NaN (NaN when there is none)."""
    key = f"final_{metric.short}_mean"
    return metric.best(row[key] for row in rows if math.isfinite(row[key]))


# ------------------------------------------------------------------------------------------ notes


def _relative(path: Path, root: Path) -> str:
    """``path`` as seen from ``root`` (its name when it is ``root``; as given when it is not under it)."""
    path_, root_ = path.resolve(), root.resolve()
    if path_ == root_:
        return path.name
    return path_.relative_to(root_).as_posix() if path_.is_relative_to(root_) else path.as_posix()


def common_parent(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every one of ``paths``, spelled as they are (relative paths give a relative
    parent, so that a report's heading reads the same from any clone); resolved where the spellings mix."""
    spelled = [os.path.normpath(p) for p in paths]
    if len({os.path.isabs(p) for p in spelled}) == 1:
        return Path(os.path.commonpath(spelled) or ".")
    return Path(os.path.commonpath([p.resolve() for p in paths]))


def problem_lines(runs: list[Run], root: Path) -> list[str]:
    """One Markdown bullet per failed, incomplete or missing job.

    Parameters
    ----------
    runs : list of Run
        All jobs, from :func:`load_runs`.
    root : Path
        The path given to the command, or the common parent of several (job paths are shown relative to it).

    Returns
    -------
    list of str
        Failed/incomplete/unreadable jobs, then ``(method, seed)`` pairs absent although that seed
        ran for another method, then methods whose runs differ in more than the seed.
    """
    lines = []
    for run in runs:
        if not run.ok:
            where = _relative(run.path, root)
            seed = "?" if run.seed is None else run.seed
            lines.append(f"- **{run.status}** `{where}` ({run.method}, seed {seed}): {run.error}")
    seeds = {r.seed for r in runs if r.seed is not None}
    tried = {(r.method, r.seed) for r in runs}
    for method in sorted({r.method for r in runs if r.ok}):
        missing = sorted((s for s in seeds if (method, s) not in tried), key=str)
        if missing:
            seeds_text = ", ".join(map(str, missing))
            lines.append(f"- **missing** {method}: no job for seed {seeds_text} (run for other methods)")
    for method, group in group_by_method(runs).items():
        mixed = _differing_keys([r.config for r in group])
        if mixed:
            lines.append(f"- **note** {method} averages runs whose configs differ in: {', '.join(mixed)}")
    metrics = sorted({r.metric.name for r in runs if r.ok})
    if len(metrics) > 1:
        lines.append(f"- **note** the runs belong to different tasks ({', '.join(metrics)}); the table shows "
                     f"{report_metric(runs).name}: report each task's runs separately")
    return lines


def _differing_keys(configs: list[dict[str, Any]]) -> list[str]:
    flats = [_flatten(c) for c in configs]
    keys = set().union(*flats) if flats else set()
    return sorted(k for k in keys if k.split(".")[0] not in _PER_JOB_KEYS
                  and len({_value_key(f.get(k)) for f in flats}) > 1)


def _without(config: dict[str, Any], dotted: str) -> dict[str, Any]:
    """A copy of ``config`` without the dotted key ``dotted`` (``compression.density``)."""
    head, _, rest = dotted.partition(".")
    if head not in config:
        return dict(config)
    if not rest:
        return {k: v for k, v in config.items() if k != head}
    inner = config[head]
    return {**config, head: _without(inner, rest) if isinstance(inner, dict) else inner}


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# ----------------------------------------------------------------------------------------- writing


def fmt_bytes(value: float) -> str:
    """``1234`` -> ``"1.2 KB"``, ``2573125`` -> ``"2.57 MB"``, ``400`` -> ``"400 B"`` (decimal units)."""
    if not math.isfinite(value):
        return "n/a"
    if value >= 1e6:
        return f"{value / 1e6:.2f} MB"
    return f"{value / 1e3:.1f} KB" if value >= 1e3 else f"{value:.0f} B"


def markdown_table(rows: list[dict[str, Any]], metric: Metric = ACCURACY, given_target: bool = False) -> str:
    """The summary rows as a Markdown table with units."""
    s = metric.short
    if given_target:
        target = f"{rows[0]['target']:.3f}" if rows else "target"
    else:
        target = f"{TARGET_SHARE:.0%} of best" if metric.higher_is_better else f"best / {TARGET_SHARE}"
    head = ["method", "seeds", f"final {s}", f"last {TAIL_ROUNDS} rounds' {s}", f"best {s}", f"rounds to {target}",
            "bytes to target (up / down)",
            f"{s} at budget (rounds)", "up / round", "down / round", "up compression", "down compression", "wall time",
            "failed clients"]
    private = any(math.isfinite(row.get("epsilon", math.nan)) for row in rows)
    if private:
        head.append("epsilon")
    per_client = any(math.isfinite(row.get(f"client_{s}_mean", math.nan)) for row in rows)
    if per_client:  # data.client_test_fraction > 0: each client's own held-out data, after the last round
        head[5:5] = [f"clients' mean {s}", f"worst client {s}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        final = f"{row[f'final_{s}_mean']:.3f} ± {row[f'final_{s}_std']:.3f}"
        to_target = ("—" if not math.isfinite(row["up_bytes_to_target"])
                     else f"{fmt_bytes(row['up_bytes_to_target'])} / {fmt_bytes(row['down_bytes_to_target'])}")
        at_budget = ("n/a" if not math.isfinite(row[f"{s}_at_budget_mean"])
                     else f"{row[f'{s}_at_budget_mean']:.3f} ({row['rounds_in_budget']:.1f})")
        if row.get("personalized"):
            final += " †"
        tail = ("n/a" if not math.isfinite(row[f"tail_{s}_mean"])
                else f"{row[f'tail_{s}_mean']:.3f} ± {row[f'tail_{s}_std']:.3f}")
        cells = [row["method"], str(row["n_seeds"]), final, tail, f"{row[f'best_{s}_mean']:.3f}",
                 _fmt_rounds(row), to_target, at_budget, fmt_bytes(row["up_bytes_per_round"]),
                 fmt_bytes(row["down_bytes_per_round"]), _fmt_ratio(row["up_compression_ratio"]),
                 _fmt_ratio(row["down_compression_ratio"]), f"{row['wall_time_s']:.0f} s", str(row["failed_clients"])]
        if private:
            cells.append(f"{row['epsilon']:.2f}" if math.isfinite(row["epsilon"]) else "∞ (no DP)")
        if per_client:
            cells[5:5] = [f"{row[f'client_{s}_{w}']:.3f}" if math.isfinite(row[f"client_{s}_{w}"]) else "n/a"
                          for w in ("mean", "worst")]
        lines.append("| " + " | ".join(cells) + " |")
    if any(row.get("personalized") for row in rows):
        lines.append(f"\n† no global model (each client keeps its own B and head): the {s} columns are the mean over "
                     "clients of each client's own model on its own held-out examples, not the test set.")
    return "\n".join(lines)


def _fmt_rounds(row: dict[str, Any]) -> str:
    if row["rounds_to_target"] == "never":
        return "never"
    text = f"{row['rounds_to_target']:.1f}"
    if row["seeds_reached_target"] < row["n_seeds"]:
        text += f" ({row['seeds_reached_target']}/{row['n_seeds']} seeds)"
    return text


def _fmt_ratio(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.1f}×"


def markdown_report(runs: list[Run], rows: list[dict[str, Any]], root: Path, command: str,
                    metric: Metric = ACCURACY, *, given_target: bool = False, given_budget: bool = False,
                    extra: list[str] | None = None, all_runs: list[Run] | None = None) -> str:
    """The whole ``report.md``: heading, table, target, budget, problems, command.

    ``runs`` are the runs the table reports; ``all_runs`` (default ``runs``) every job, which the count
    of completed jobs is out of (with ``--tune``, the runs of the values not chosen are not reported).
    """
    best = best_final_mean(rows, metric)
    jobs = runs if all_runs is None else all_runs
    done = sum(r.ok for r in jobs)
    target_note = (_metric_note(metric, best) if not given_target else
                   f"{metric.name.capitalize()}: final, mean ± sample std over seeds (last {TAIL_ROUNDS} rounds': "
                   f"each run's mean over its last {TAIL_ROUNDS} rounds). Rounds to "
                   f"{rows[0]['target']:.3f} (given): first round reaching it, mean over the seeds that do.")
    parts = [f"# fedlora report: `{root}`", "",
             f"{done} of {len(jobs)} jobs completed, {len(rows)} method(s). " + target_note
             + " Bytes to target: up and down from the start through that round (mean over those seeds). "
             + _budget_note(rows, metric, given_budget)
             + " Bytes per round: summed over clients; up and down compression: the uncompressed method's "
             "bytes over this one's, in each direction.", "",
             markdown_table(rows, metric, given_target), "", *(extra or [])]
    problems = problem_lines(runs, root)
    parts += ["## Failed or missing jobs", "", *(problems or ["- none"]), ""]
    parts += [f"Produced by `{command}`.", ""]
    return "\n".join(parts)


def _budget_note(rows: list[dict[str, Any]], metric: Metric, given: bool) -> str:
    """How the "at budget" column is computed, with the budget."""
    budget = rows[0]["budget_bytes"] if rows else math.nan
    if not math.isfinite(budget):
        return "No method communicated, so there is no byte budget."
    why = "given" if given else "what the cheapest communicating method spent over its whole run"
    return (f"{metric.short} at budget: the {metric.short} of the last round whose traffic so far (up + down) is "
            f"within {fmt_bytes(budget)} ({why}), mean over seeds, with the rounds that fit in brackets.")


def _metric_note(metric: Metric, best: float) -> str:
    """How the table's metric columns and the "rounds to target" column are computed."""
    if metric.higher_is_better:
        return ("Accuracy: final test accuracy, mean ± sample std over seeds; last "
                f"{TAIL_ROUNDS} rounds': each run's mean over its last {TAIL_ROUNDS} rounds, then mean ± std over "
                "seeds. Rounds to "
                f"{TARGET_SHARE:.0%} of best: first round reaching {TARGET_SHARE} × {best:.3f} = "
                f"{TARGET_SHARE * best:.3f} (best final-accuracy mean), mean over the seeds that reach it.")
    return ("ppl: final held-out perplexity (exp of the mean cross-entropy per response token; lower is "
            f"better), mean ± sample std over seeds (last {TAIL_ROUNDS} rounds': each run's mean over its last "
            f"{TAIL_ROUNDS} rounds). Rounds to best / {TARGET_SHARE}: first round at or "
            "below "
            f"{best:.3f} / {TARGET_SHARE} = {target_value(best, metric):.3f} (lowest final-perplexity mean), "
            "mean over the seeds that reach it.")


def write_csv(rows: list[dict[str, Any]], path: Path, metric: Metric = ACCURACY) -> None:
    """Write the summary rows (raw numbers: bytes, seconds) to ``path``."""
    names = columns(metric)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows({k: ("" if row[k] is None else row[k]) for k in names} for row in rows)


def curves(group: list[Run], metric: Metric = ACCURACY) -> dict[str, np.ndarray]:
    """Per-round metric (mean/min/max over seeds) and mean cumulative MB (up+down).

    Parameters
    ----------
    group : list of Run
        The completed runs of one method.

    Returns
    -------
    dict of ndarray
        ``round``, ``mean``, ``min``, ``max``, ``mb``; runs of different length are NaN-padded.
    """
    n = max(len(r.rows) for r in group)
    acc = np.full((len(group), n), np.nan)
    mb = np.full((len(group), n), np.nan)
    for i, run in enumerate(group):
        acc[i, : len(run.rows)] = [_nan_if_none(r.metric(metric.key)) for r in run.rows]
        traffic = [r.bytes_total("up") + r.bytes_total("down") for r in run.rows]
        mb[i, : len(run.rows)] = np.cumsum(traffic) / 1e6
    rounds = max(group, key=lambda r: len(r.rows)).rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
        return {"round": np.array([r.round for r in rounds]), "mean": np.nanmean(acc, axis=0),
                "min": np.nanmin(acc, axis=0), "max": np.nanmax(acc, axis=0), "mb": np.nanmean(mb, axis=0)}


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


PLOT_COLORS = 10  # matplotlib's default cycle; past it, a method is told apart by its line and marker too
LEGEND_COLUMNS = 3
LEGEND_ROW_INCHES = 0.22


def plot_style(index: int) -> tuple[str, str, str]:
    """The color, line style and marker of the ``index``-th method in a plot: the first ten differ in color
    (as before), every later ten repeat the colors with the next line style and marker, so no two of 40
    methods look alike."""
    turn = index // PLOT_COLORS
    return f"C{index % PLOT_COLORS}", ("-", "--", ":", "-.")[turn % 4], ("o", "s", "^", "D")[turn % 4]


def plot_report(runs: list[Run], path: Path, metric: Metric = ACCURACY, budget: float | None = None) -> Path:
    """Draw the metric vs round and vs cumulative MB (log x) per method into ``path``; ``budget`` (bytes)
    is marked on the second panel."""
    import matplotlib  # noqa: PLC0415 - slow to import, only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib import ticker  # noqa: PLC0415

    groups = group_by_method(runs)
    shared = len(groups) > PLOT_COLORS  # one legend under both panels: inside, it would hide the curves
    rows = math.ceil(len(groups) / LEGEND_COLUMNS) if shared else 0
    fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5 + LEGEND_ROW_INCHES * rows))
    for i, (method, group) in enumerate(groups.items()):
        color, line, marker = plot_style(i)
        c = curves(group, metric)
        ax_r.plot(c["round"], c["mean"], marker=marker, ms=3, color=color, linestyle=line,
                  label=f"{method} (n={len(group)})")
        ax_r.fill_between(c["round"], c["min"], c["max"], color=color, alpha=0.2, linewidth=0)
        keep = np.isfinite(c["mb"]) & (c["mb"] > 0)
        if keep.any():
            ax_b.plot(c["mb"][keep], c["mean"][keep], marker=marker, ms=3, color=color, linestyle=line, label=method)
    ax_r.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax_r.set(xlabel="round", ylabel=metric.name, title=f"{metric.name} (mean, min–max band over seeds)")
    ax_b.set(xlabel="cumulative MB communicated (up + down)", ylabel=metric.name,
             title=f"{metric.name.removeprefix('test ')} vs communication")
    if not metric.higher_is_better:  # perplexity falls by orders of magnitude
        for ax in (ax_r, ax_b):
            ax.set_yscale("log")
    budget_line = None
    if ax_b.lines and budget is not None and math.isfinite(budget) and budget > 0:
        budget_line = ax_b.axvline(budget / 1e6, color="0.4", linestyle="--", linewidth=1,
                                   label=f"budget {fmt_bytes(budget)}")
    if ax_b.lines:
        ax_b.set_xscale("log")
        ax_b.xaxis.set_major_formatter(ticker.LogFormatter(labelOnlyBase=False))  # 20, not 2×10¹
        ax_b.xaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    for ax in (ax_r, ax_b):
        ax.grid(alpha=0.3)
    if shared:
        fig.legend(*ax_r.get_legend_handles_labels(), loc="lower center", ncol=LEGEND_COLUMNS, fontsize=8,
                   frameon=False)
        if budget_line is not None:  # the methods are in the shared legend; the budget only here
            ax_b.legend(handles=[budget_line], fontsize=8)
        fig.tight_layout(rect=(0.0, LEGEND_ROW_INCHES * rows / fig.get_figheight(), 1.0, 1.0))
    else:
        for ax in (ax_r, ax_b):
            if ax.lines:
                ax.legend(fontsize=8)
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def privacy_points(runs: list[Run], metric: Metric = ACCURACY) -> dict[str, list[dict[str, Any]]]:
    """The final metric against epsilon, per method without its privacy: what ``privacy.png`` draws.

    A method's runs at one privacy budget (``fedavg+dp_sgd(eps=3)``) are one point of its base method
    (``fedavg``) at the epsilon they spent (``summary.json``'s ``dp_epsilon``, the largest client's; mean over
    seeds); its runs without privacy (``target_epsilon=inf`` or ``privacy=none``) are the point at
    ``math.inf``. A private method whose runs recorded no epsilon is left out (the table still lists it). Only
    base methods with a private point are returned; points sorted by epsilon.

    Returns
    -------
    dict
        ``{base method: [{"epsilon", "mean", "std", "values", "method"}, ...]}``.

    >>> def run(seed, eps, acc):
    ...     privacy = {"kind": "dp_sgd", "target_epsilon": eps}
    ...     label = "fedavg" + privacy_label(privacy)
    ...     spent = {"dp_epsilon": eps} if math.isfinite(eps) else {}
    ...     return Run(path=Path(str(seed)), config={"privacy": privacy, "seed": seed}, method=label,
    ...                summary={"final_test_accuracy": acc, **spent})
    >>> points = privacy_points([run(0, 3.0, 0.3), run(1, 3.0, 0.5), run(0, math.inf, 0.9)])
    >>> [(p["epsilon"], p["mean"], p["values"]) for p in points["fedavg"]]
    [(3.0, 0.4, [0.3, 0.5]), (inf, 0.9, [0.9])]
    """
    bases: dict[str, list[dict[str, Any]]] = {}
    for method, group in group_by_method(runs).items():
        privacy = group[0].config.get("privacy") or {}
        budget = privacy_label({**privacy, "secure": False})
        row = _method_row(method, group, metric)  # the table's own mean, std and spent epsilon
        epsilon = row["epsilon"] if budget else math.inf
        if budget and not math.isfinite(epsilon):  # private without a recorded epsilon: never drawn as no DP
            continue
        bases.setdefault(method.replace(budget, "", 1) if budget else method, []).append({
            "method": method, "epsilon": epsilon, "mean": row[f"final_{metric.short}_mean"],
            "std": row[f"final_{metric.short}_std"], "values": [final_value(r, metric) for r in group]})
    return {base: sorted(points, key=lambda p: p["epsilon"]) for base, points in bases.items()
            if any(math.isfinite(p["epsilon"]) for p in points)}


def plot_privacy(runs: list[Run], path: Path, metric: Metric = ACCURACY) -> Path | None:
    """Draw the final metric against epsilon (log x) per base method into ``path``: mean with the sample std
    as error bar, each seed a dot, the method without privacy a dashed line at its mean. ``None`` (nothing
    written) when no run is private."""
    points = privacy_points(runs, metric)
    if not points:
        return None
    import matplotlib  # noqa: PLC0415 - slow to import, only needed here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (base, pts) in enumerate(points.items()):
        color, private = f"C{i % 10}", [p for p in pts if math.isfinite(p["epsilon"])]
        eps = [p["epsilon"] for p in private]
        ax.errorbar(eps, [p["mean"] for p in private], yerr=[p["std"] for p in private], marker="o", ms=4,
                    capsize=3, color=color, label=f"{base} (n={max(len(p['values']) for p in pts)})")
        for p in private:
            ax.scatter([p["epsilon"]] * len(p["values"]), p["values"], s=10, color=color, alpha=0.4)
        for p in pts:
            if not math.isfinite(p["epsilon"]):
                ax.axhline(p["mean"], color=color, linestyle="--", linewidth=1, label=f"{base}, no DP")
    ax.set_xscale("log")
    ticks = sorted({round(p["epsilon"], 2) for pts in points.values() for p in pts if math.isfinite(p["epsilon"])})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set(xlabel="epsilon (the largest client's, whole run; log)", ylabel=f"final {metric.name}",
           title=f"final {metric.name.removeprefix('test ')} vs privacy budget (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(runs: list[Run], root: Path, out: Path, command: str, *, target: float | None = None,
                 budget: float | None = None, tune: str | None = None,
                 paired: str | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out``, and ``privacy.png`` when a run is
    private (:func:`plot_privacy`; without a private run, a ``privacy.png`` already in ``out`` is removed).

    ``target`` and ``budget`` (bytes) override the defaults of :func:`summarize`; ``tune`` reports each
    method at the value of that config key chosen on validation (:func:`choose_on_validation`); ``paired``
    adds each method's seed-by-seed difference to that method (:func:`paired_differences`).

    Returns
    -------
    tuple
        The Markdown text and the summary rows.
    """
    out.mkdir(parents=True, exist_ok=True)
    metric = report_metric(runs)
    chosen: list[str] = []
    reported = runs
    if tune is not None:  # the table and the plot hold the chosen values' runs; the job count, all of them
        reported, choices = choose_on_validation(runs, tune, metric)
        chosen = choices_markdown(tune, choices, metric)
    rows = summarize(reported, metric, target=target, budget=budget)
    if paired is not None:
        chosen += paired_markdown(paired, paired_differences(reported, paired, metric), metric)
    if plot_privacy(reported, out / "privacy.png", metric) is None:
        # an earlier report into the same folder may have drawn one: it would describe other runs
        (out / "privacy.png").unlink(missing_ok=True)
    else:
        chosen += [f"{metric.name.capitalize()} against epsilon: `privacy.png` (the final value of each method "
                   "without its privacy, mean ± sample std over seeds).", ""]
    text = markdown_report(reported, rows, root, command, metric, given_target=target is not None,
                           given_budget=budget is not None, extra=chosen, all_runs=runs)
    (out / "report.md").write_text(text)
    write_csv(rows, out / "report.csv", metric)
    plot_report(reported, out / "report.png", metric, budget=rows[0]["budget_bytes"] if rows else None)
    return text, rows


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Console script ``fedlora-report PATH [--out DIR]``.

    Returns
    -------
    int
        0 when the report was written, 1 when it was written but no job completed; exits with 2
        (argparse error) when ``PATH`` holds no run dir.
    """
    parser = argparse.ArgumentParser(
        prog="fedlora-report",
        description="Compare the runs of a fedlora sweep: writes report.md, report.csv and report.png.")
    parser.add_argument("path", type=Path, nargs="+",
                        help="a sweep dir (runs/sweep_<time>), a run dir, or a folder above them; several are "
                             "reported together (then --out is needed)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the report (default: PATH, when there is one)")
    parser.add_argument("--target", type=float, default=None,
                        help="the accuracy (or perplexity) that 'rounds/bytes to target' wait for "
                             f"(default: {TARGET_SHARE} x the best final mean; perplexity: the lowest / "
                             f"{TARGET_SHARE})")
    parser.add_argument("--budget-mb", type=float, default=None,
                        help="the traffic budget, up plus down, in MB (10^6 bytes) for the 'at budget' column "
                             "(default: what the cheapest communicating method spent over its whole run)")
    parser.add_argument("--tune", metavar="KEY", default=None,
                        help="a config key the sweep varies, e.g. compression.alpha: report each method at the value "
                             "whose mean final validation accuracy is best (runs made with "
                             "data.validation_fraction > 0), never at the best test value")
    parser.add_argument("--paired", metavar="METHOD", default=None,
                        help="a method of the table, e.g. fedavg: add each other method's difference to it seed by "
                             "seed (runs of one seed share the partition, ranks and sampling), mean ± std")
    args = parser.parse_args(argv)
    for path in args.path:
        if not path.is_dir():
            parser.error(f"{path} is not a directory: give a sweep dir (runs/sweep_<time>), a run dir or a folder "
                         "above them")
    if len(args.path) > 1 and args.out is None:
        parser.error(f"{len(args.path)} folders given and no --out: say where the report that gathers them goes, "
                     "e.g. --out runs/report")
    if args.target is not None and not math.isfinite(args.target):
        parser.error(f"--target={args.target} is not a finite number; give an accuracy such as 0.9")
    if args.budget_mb is not None and not (math.isfinite(args.budget_mb) and args.budget_mb > 0):
        parser.error(f"--budget-mb={args.budget_mb} must be a positive number of MB, e.g. --budget-mb 50")
    runs = load_runs(args.path)
    given = " ".join(str(p) for p in args.path)
    if not runs:
        parser.error(f"no runs under {given}: a run dir holds metrics.jsonl (plus config.yaml and "
                     "summary.json) as written by `fedlora`; give a runs/sweep_<time> or "
                     "runs/<time>_<name> dir")
    # the folder the report names, and against which it names each job: the one given, or their common parent
    root = args.path[0] if len(args.path) == 1 else common_parent(args.path)
    out = args.out or args.path[0]
    extra = (["--out", str(args.out)] if args.out else []) + (
        ["--target", str(args.target)] if args.target is not None else []) + (
        ["--budget-mb", str(args.budget_mb)] if args.budget_mb is not None else []) + (
        ["--tune", args.tune] if args.tune else []) + (["--paired", args.paired] if args.paired else [])
    command = shlex.join(["fedlora-report", *map(str, args.path), *extra])
    budget = args.budget_mb * 1e6 if args.budget_mb is not None else None
    try:
        text, rows = write_report(runs, root, out, command, target=args.target, budget=budget, tune=args.tune,
                                  paired=args.paired)
    except ChoiceError as exc:
        parser.error(str(exc))
    print(text)
    private = ", " + str(out / "privacy.png") if "`privacy.png`" in text else ""
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}{private}")
    if not rows:
        print(f"fedlora-report: no job under {given} completed; see the list above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
