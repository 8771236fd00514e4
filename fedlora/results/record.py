"""The round record: one line of ``metrics.jsonl``, typed (standard library only).

The round loop builds a :class:`RoundRecord` per round, the recorder writes it, the checkpoint keeps
the lines written so far and ``fedlora-report`` reads them back; all through this one type. On
disk a record is one JSON object (keys sorted) with the task's metrics at the top level::

    {"round": 3, "test_accuracy": 0.87, "test_loss": 0.41, "train_loss": 0.52,
     "wall_time": 81.2, "round_seconds": 27.0, "eval_seconds": 3.1,
     "clients": [{"client": 0, "rank": 2, "status": "ok", "num_examples": 46, ...}, ...],
     "num_ok": 10, "num_failed": 0, "num_rejected": 0, "bytes_up_total": ..., "bytes_down_total": ...,
     "strategy": {"product_gap_rel": 0.14},
     "slot_energy": [0.61, 0.22, 0.09, 0.05, ...], "shared_slot_energy": 0.83,
     "client_eval": {"mean": {"test_accuracy": 0.86, ...}, "worst": 0.62, "worst_client": 7, "clients": [...]}}

Round 0 (the evaluation before training) has no clients' counts, bytes or strategy metrics, and
its ``train_loss`` is ``null``. ``aggregation_skipped`` appears only in a round that kept the
global adapter, with the reason; ``client_eval`` only in a round after which every client evaluated the
global model on its own held-out examples (``data.client_test_fraction > 0``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
STATUSES = ("ok", "failed", "rejected")
# Fields a report must not compare between runs: they measure the machine, not the method.
TIMING_FIELDS = ("wall_time", "round_seconds", "train_seconds", "eval_seconds")


@dataclass
class ClientRow:
    """One sampled client in one round.

    ``status`` is ``ok`` (its update was aggregated), ``failed`` (an error reply, or no reply
    within the round's timeout) or ``rejected`` (it arrived but failed the checks; ``error`` says
    why). The training fields are set only for ``ok``; ``bytes_up`` for every reply that arrived.
    """

    client: int
    rank: int
    bytes_down: int
    status: str = "ok"
    error: str | None = None
    bytes_up: int | None = None
    num_examples: int | None = None
    train_loss: float | None = None
    train_seconds: float | None = None
    base_version: int | None = None  # the number of base merges the client trained on
    epsilon: float | None = None  # privacy=dp_sgd: the client's epsilon after this round (every round it was sent)

    def fail(self, reason: str) -> None:
        """Mark the client ``failed`` with ``reason``."""
        self.status, self.error = "failed", reason

    def reject(self, reason: str) -> None:
        """Mark the client ``rejected`` with ``reason``: its training fields no longer count."""
        self.status, self.error = "rejected", reason
        self.num_examples = self.train_loss = self.train_seconds = self.base_version = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (unset fields left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> ClientRow:
        """Read a row written by :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass
class ClientEvaluation:
    """Every client's evaluation of the global model on the examples it holds out (``data.client_test_fraction``).

    ``clients`` has one entry per client: ``{"client", "bytes_down", "num_examples", <metric>: value, ...}``, or
    ``{"client", "bytes_down", "error"}`` for a client that did not answer. ``mean`` is each metric's mean over
    the clients that answered, each client counting once (not weighted by its examples); ``worst`` is the task
    metric of the worst of them and ``worst_client`` who that is (``None`` when nobody answered).
    """

    clients: list[dict[str, Any]]
    mean: dict[str, float]
    worst: float | None
    worst_client: int | None
    eval_seconds: float = 0.0

    @property
    def num_failed(self) -> int:
        """Clients that did not answer."""
        return sum("error" in c for c in self.clients)

    @property
    def bytes_down_total(self) -> int:
        """Bytes of the evaluation messages."""
        return sum(int(c.get("bytes_down", 0)) for c in self.clients)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object under a record's ``client_eval``."""
        return {"clients": self.clients, "mean": self.mean, "worst": self.worst, "worst_client": self.worst_client,
                "eval_seconds": self.eval_seconds, "num_failed": self.num_failed,
                "bytes_down_total": self.bytes_down_total}

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> ClientEvaluation:
        """Read what :meth:`to_dict` wrote."""
        return cls(clients=list(row.get("clients") or []), mean=dict(row.get("mean") or {}), worst=row.get("worst"),
                   worst_client=row.get("worst_client"), eval_seconds=float(row.get("eval_seconds", 0.0)))


@dataclass
class RoundRecord:
    """One round of a run: the global model's metrics after it, and what every sampled client did.

    ``metrics`` holds the task's held-out metrics (``test_loss`` and ``test_accuracy``, or
    ``test_perplexity`` and ``test_tokens``); ``strategy`` the strategy's own scalars (``None`` in
    round 0). ``slot_energy`` is the rank-collapse diagnostic: the share of the energy of the global
    adapter's change this round in each rank slot (:func:`fedlora.core.lora_math.slot_update_energy`),
    and ``shared_slot_energy`` the share in the first ``r_min`` slots, those every aggregated client
    trained; both ``None`` when the adapter did not change (a kept round, or FLoRA, whose update is
    all in its base merge). ``dp_epsilon`` (with ``privacy=dp_sgd``) is the largest epsilon, at the
    run's delta, that any client has spent up to this round: the guarantee every client's data has.
    """

    round: int
    metrics: dict[str, float]
    train_loss: float | None
    wall_time: float
    eval_seconds: float | None = None
    round_seconds: float | None = None
    clients: list[ClientRow] = field(default_factory=list)
    strategy: dict[str, float] | None = None
    aggregation_skipped: str | None = None
    slot_energy: list[float] | None = None  # share of the round's adapter update in each rank slot
    shared_slot_energy: float | None = None  # the share in the slots every aggregated client trains
    dp_epsilon: float | None = None  # privacy=dp_sgd: the largest epsilon any client has spent so far
    client_eval: ClientEvaluation | None = None  # every client's evaluation of the global model (when due)

    def count(self, status: str) -> int:
        """How many sampled clients ended the round with ``status``."""
        return sum(c.status == status for c in self.clients)

    @property
    def num_ok(self) -> int:
        """Clients whose update was aggregated."""
        return self.count("ok")

    def bytes_total(self, direction: str) -> int:
        """Bytes sent to (``"down"``) or received from (``"up"``) every client this round."""
        return sum(c.bytes_down if direction == "down" else (c.bytes_up or 0) for c in self.clients)

    def metric(self, key: str) -> float | None:
        """The value of metric ``key`` (``None`` when this record has no such metric)."""
        return self.metrics.get(key)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``metrics.jsonl``."""
        out: dict[str, Any] = {"round": self.round, **self.metrics, "train_loss": self.train_loss,
                               "wall_time": self.wall_time, "clients": [c.to_dict() for c in self.clients]}
        if self.eval_seconds is not None:
            out["eval_seconds"] = self.eval_seconds
        if self.round >= 1:
            out.update(round_seconds=self.round_seconds, num_ok=self.num_ok, num_failed=self.count("failed"),
                       num_rejected=self.count("rejected"), bytes_down_total=self.bytes_total("down"),
                       bytes_up_total=self.bytes_total("up"), strategy=dict(self.strategy or {}))
        if self.aggregation_skipped is not None:
            out["aggregation_skipped"] = self.aggregation_skipped
        if self.slot_energy is not None:
            out.update(slot_energy=self.slot_energy, shared_slot_energy=self.shared_slot_energy)
        if self.dp_epsilon is not None:
            out["dp_epsilon"] = self.dp_epsilon
        if self.client_eval is not None:
            out["client_eval"] = self.client_eval.to_dict()
        return out

    def to_json(self) -> str:
        """One line of ``metrics.jsonl`` (keys sorted)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> RoundRecord:
        """Read a record written by :meth:`to_dict` (or by an earlier fedlora)."""
        own = {"round", "train_loss", "wall_time", "eval_seconds", "round_seconds", "clients", "strategy",
               "aggregation_skipped", "slot_energy", "shared_slot_energy", "dp_epsilon", "client_eval"}
        derived = {"num_ok", "num_failed", "num_rejected", "bytes_down_total", "bytes_up_total"}
        metrics = {k: v for k, v in row.items() if k not in own | derived}
        return cls(round=int(row["round"]), metrics=metrics, train_loss=row.get("train_loss"),
                   wall_time=float(row.get("wall_time", 0.0)), eval_seconds=row.get("eval_seconds"),
                   round_seconds=row.get("round_seconds"),
                   clients=[ClientRow.from_dict(c) for c in row.get("clients") or []],
                   strategy=row.get("strategy"), aggregation_skipped=row.get("aggregation_skipped"),
                   slot_energy=row.get("slot_energy"), shared_slot_energy=row.get("shared_slot_energy"),
                   dp_epsilon=row.get("dp_epsilon"),
                   client_eval=ClientEvaluation.from_dict(row["client_eval"]) if row.get("client_eval") else None)


def read_records(run_dir: Path) -> list[RoundRecord]:
    """The round records of a run, round 0 first (``ValueError`` naming the line that is not JSON)."""
    return [RoundRecord.from_dict(row) for row in read_rows(Path(run_dir) / METRICS_FILE)]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (blank lines skipped)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{Path(path).name} line {number} is not JSON ({exc})") from None
    return rows
