"""The round loop of a federated run, in plain Python: no Flower, no model code.

One round::

    sample (seeded) -> plan each client (strategy) -> encode (wire) -> send and receive (transport)
    -> decode and check every reply -> aggregate (strategy) -> adopt only a finite aggregate
    -> evaluate the global model (server model) -> record -> checkpoint

Everything it talks to is a small protocol: the :class:`~fedlora.core.types.Strategy`, the
optional :class:`~fedlora.core.types.Compressor` (to decode compressed replies), a
:class:`~fedlora.federation.transport.Transport` and a :class:`ServerModel` (the runtime's
evaluation and saving). The same loop runs a simulation on Ray, a deployment, the centralized
bound and the unit tests' in-memory federations.

Replies are handled in client order, never arrival order, so that every sum comes out bitwise the
same in every run; sampling, plans and fault decisions are seeded (:mod:`fedlora.core.seeds`); the
checkpoint after each round holds everything the server knows, so a resumed run computes exactly
what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from fedlora.core import control as ctl
from fedlora.core import lora_math as lm
from fedlora.core import participation as part
from fedlora.core import secure, seeds, validation
from fedlora.core.errors import RunError
from fedlora.core.metrics import Metric
from fedlora.core.privacy import ClientLevel, private_mean, release
from fedlora.core.types import (
    PERSONAL_KEPT,
    PERSONAL_START,
    AdapterSpec,
    AdapterState,
    AggregateResult,
    BaseMerge,
    ClientPlan,
    ClientUpdate,
    Compressor,
    Strategy,
    Tensor,
)
from fedlora.federation import downlink as dl
from fedlora.federation import wire
from fedlora.federation.sampling import describe_rank_change, sample_clients
from fedlora.federation.transport import (
    ClientInfo,
    Delivery,
    EvaluatingTransport,
    Exchange,
    SecureExchange,
    SecureTransport,
    Transport,
)
from fedlora.results import checkpoint as ckpt
from fedlora.results.generations import truncate_generations
from fedlora.results.plots import plot_run
from fedlora.results.record import METRICS_FILE, ClientEvaluation, ClientRow, RoundRecord, read_records
from fedlora.results.recorder import RunRecorder
from fedlora.results.summary import final_metrics, write_summary


class RunInterrupted(Exception):  # noqa: N818 - a stop, not an error
    """The run was asked to stop (its stop event: Ctrl-C, SIGTERM, or the engine failed).

    ``last_round`` is the last complete, checkpointed round: the resume point (``-1``: none yet).
    """

    def __init__(self, last_round: int) -> None:
        where = f"after round {last_round}" if last_round >= 0 else "before round 0"
        super().__init__(f"the run was stopped {where}")
        self.last_round = last_round


class NoProgress(RunError):
    """No round aggregated an update: the run learned nothing and its adapter is not saved."""


@dataclass(frozen=True)
class LoopSettings:
    """The run-level settings the loop reads (built once from the config: ``fedlora.config.settings``)."""

    name: str
    seed: int
    num_clients: int
    num_rounds: int
    fraction_train: float = 1.0
    min_clients: int = 1  # never sample fewer
    min_fit_clients: int = 1  # aggregate only with at least this many valid updates
    round_timeout: float = 3600.0  # seconds to wait for a round's replies
    connect_timeout: float = 600.0  # seconds to wait for the clients to connect
    max_norm_ratio: float | None = 10.0  # reject updates moving more than this x the others' median
    checkpoint: bool = True
    resume: bool = False  # continue from the run directory's checkpoint
    # who takes part in a round: sampled by the server (uniform) or on their own (bernoulli), FedAU's weights
    participation: part.ParticipationSettings = field(default_factory=part.ParticipationSettings)
    # every client evaluates the global model on its held-out examples (data.client_test_fraction > 0) every
    # this many rounds and after the last (0: after the last only); None: no per-client evaluation
    client_eval_every: int | None = None

    def client_eval_due(self, server_round: int) -> bool:
        """Whether the clients evaluate the global model after ``server_round``."""
        every = self.client_eval_every
        if every is None or server_round < 1:
            return False
        return server_round == self.num_rounds or (every > 0 and server_round % every == 0)


class ServerModel(Protocol):
    """The runtime behind the loop on the server: the global model it evaluates and saves."""

    metric: Metric
    label_names: tuple[str, ...]

    def spec(self, r_max: int) -> AdapterSpec:
        """The adapted modules' shapes and the initial head, for the strategy's ``init``."""
        ...

    def scaling(self, rank: int) -> float:
        """The LoRA scaling ``s = alpha / r`` of a rank-``rank`` adapter."""
        ...

    def alpha(self, rank: int) -> float:
        """``lora_alpha`` of a rank-``rank`` adapter."""
        ...

    def evaluate(self, server_round: int, adapter: AdapterState, rank: int,
                 merges: Sequence[BaseMerge]) -> dict[str, float]:
        """The task's held-out metrics of the base (plus ``merges``) with ``adapter`` at ``rank``."""
        ...

    def save(self, adapter: AdapterState, rank: int, alpha: float) -> dict[str, Any]:
        """Save the final adapter (peft format); return the summary's entries about what was saved."""
        ...

    def notes(self) -> list[str]:
        """Lines worth printing before round 0 (for example how many examples were truncated)."""
        ...


class PrivacyLedger(Protocol):
    """A client's privacy spend (``privacy=dp_sgd``): what its accountant says after some rounds."""

    delta: float

    def epsilon(self, num_examples: int, rounds: int) -> float:
        """The epsilon at ``delta`` of a client holding ``num_examples`` examples after ``rounds`` rounds."""
        ...

    def describe(self, sizes: Sequence[int]) -> str:
        """One line on the mechanism for clients of these sizes (the run's first line)."""
        ...


class ClientLevelLedger(Protocol):
    """Client-level DP (``privacy=dp_fedavg``): the mechanism's parameters and its accountant."""

    level: ClientLevel
    delta: float

    def epsilon(self, rounds: int) -> float:
        """Every client's epsilon at ``delta`` after ``rounds`` rounds."""
        ...

    def describe(self) -> str:
        """One line on the mechanism (the run's first line)."""
        ...


@dataclass
class ServerState:
    """Everything the server holds between rounds; all of it goes into the checkpoint."""

    adapter: AdapterState
    strategy_state: dict[str, Tensor]
    round: int = 0  # the last complete round
    best: float = 0.0  # the best value of the task's metric so far
    merges: list[BaseMerge] = field(default_factory=list)  # base merges, in order
    acked: dict[int, int] = field(default_factory=dict)  # client -> number of merges it has applied
    # client -> rounds it was sent a training message (its privacy spend); rebuilt from metrics.jsonl on resume
    trained: dict[int, int] = field(default_factory=dict)
    # downlink compression: client -> (round, the copy of its start it holds), moved when its reply arrives
    views: dict[int, tuple[int, AdapterState]] = field(default_factory=dict)
    sent_views: dict[int, tuple[int, AdapterState]] = field(default_factory=dict)  # this round's, until a reply
    # a personalized strategy (FedSA-LoRA): the clients known to hold their own B and head (a reply arrived to a
    # personal plan); rebuilt from metrics.jsonl on resume
    personal: set[int] = field(default_factory=set)
    # controlled averaging (compression=scafcom): the control variate c = sum_i w_i c_i, at the global rank
    control: AdapterState = field(default_factory=dict)
    # downlink=svd: module -> what the truncated merges have not sent yet (dense, on the server only)
    merge_residual: AdapterState = field(default_factory=dict)


def feedback_scope(compressor: Compressor | None, strategy: Strategy) -> str | None:
    """Which tensors carry a compression residual: ``all``, ``none``, or all but the fresh LoRA factors.

    ``None`` without compression. A strategy whose clients start fresh LoRA factors every round
    (``fresh_adapters``: FLoRA) keeps error feedback for the tensors that continue (a classifier head).
    """
    if compressor is None:
        return None
    if not compressor.error_feedback:
        return "none"
    return "all but the fresh LoRA factors" if strategy.fresh_adapters else "all"


def slot_shares(previous: AdapterState, adapter: AdapterState, ranks: Sequence[int],
                ) -> tuple[list[float] | None, float | None]:
    """The rank-collapse diagnostic of a round: each rank slot's share of the energy of the adapter's
    change, and the share in the first ``min(ranks)`` slots (the ones every aggregated client trained).

    ``(None, None)`` when the adapter did not change (a kept round; FLoRA, whose update is its merge).
    """
    energy = lm.slot_update_energy(previous, adapter)
    total = sum(energy)
    if total <= 0 or not ranks:
        return None, None
    shares = [e / total for e in energy]
    return shares, sum(shares[: min(ranks)])


OWN_MODEL = "adapter_dir"  # a client_eval row's key: where that client saved its own model (last round, FedSA-LoRA)


def summarize_clients(rows: list[dict[str, Any]], metric: Metric, seconds: float = 0.0) -> ClientEvaluation:
    """The per-client evaluation of a round: each metric's mean over the clients that answered (each client
    counts once) and the worst client by the task's ``metric`` (a tie goes to the lower client id)."""
    answered = [r for r in rows if "error" not in r and metric.key in r]
    names = sorted({k for r in answered for k in r} - {"client", "bytes_down", "num_examples", OWN_MODEL})
    mean = {k: sum(float(r[k]) for r in answered) / len(answered) for k in names if all(k in r for r in answered)}
    worst_row = None
    for r in answered:
        if worst_row is None or metric.better(float(worst_row[metric.key]), float(r[metric.key])):
            worst_row = r
    return ClientEvaluation(clients=rows, mean=mean, worst=None if worst_row is None else float(worst_row[metric.key]),
                            worst_client=None if worst_row is None else int(worst_row["client"]), eval_seconds=seconds)


def console(text: str) -> None:
    """Print one line of the run's progress."""
    print(f"[fedlora] {text}", flush=True)


def _kept_in(path: Path, say: Callable[[str], None]) -> Callable[[str], None]:
    """``say``, and each line appended to ``path`` too (a resumed run goes on in the same file), so that what
    the run said (its first line: the setting, the noise multipliers, the codes) stays with its outputs."""
    def both(text: str) -> None:
        say(text)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as kept:
            kept.write(text + "\n")
    return both


class Federation:
    """One federated run: its loop, its state and its outputs in ``run_dir``."""

    def __init__(self, settings: LoopSettings, *, strategy: Strategy, transport: Transport, model: ServerModel,
                 run_dir: Path, recorder: RunRecorder, compressor: Compressor | None = None,
                 say: Callable[[str], None] = console, stop: threading.Event | None = None,
                 privacy: PrivacyLedger | None = None, client_dp: ClientLevelLedger | None = None,
                 secure: secure.SecureSettings | None = None, downlink: Any = None) -> None:
        self.settings = settings
        # downlink=svd (fedlora.compression.merges) compresses the base merges; downlink=compeft each client's start
        self.merge_downlink = downlink if getattr(downlink, "compresses_merges", False) else None
        if self.merge_downlink is not None:
            downlink = None
            if not strategy.fresh_adapters:
                raise RunError(f"downlink=svd compresses base merges, and {type(strategy).__name__}'s clients continue "
                               "from the global adapter; use downlink=compeft (each client's copy of its start)")
            if secure is not None:
                raise RunError("downlink=svd compresses base merges, and secure aggregation merges nothing; use "
                               "downlink=none with privacy.secure=true")
        self.downlink: Compressor | None = downlink  # compresses each client's start against the copy it holds
        self.secure = secure  # secure aggregation: the server learns only the sum of the clients' vectors
        self.privacy = privacy
        self.client_dp = client_dp
        self.strategy = strategy
        self.compressor = compressor
        self.transport = transport
        self.model = model
        self.run_dir = Path(run_dir)
        self.recorder = recorder
        self.say = _kept_in(self.run_dir / "console.log", say)
        self.stop = stop or threading.Event()  # set by the glue on Ctrl-C or SIGTERM: stop at the next safe point
        self.start_wall = time.perf_counter()
        self.resumed_from = 0  # the checkpoint round this run continued from (0: a fresh run)
        self.merges_saved = 0  # base merges already in the checkpoint directory
        self.online: dict[int, float] = {}  # participation=bernoulli: each client's probability of taking part
        self.fedau: part.FedAUWeights | None = None  # FedAU's bookkeeping (participation.fedau)
        self.sizes: dict[int, int] = {}  # every client's example count, as it connected
        # no global model: each client's own B and head stay with it, and the clients evaluate every round
        self.personalized = bool(getattr(strategy, "personalized", False))
        # a strategy that weighs every client the same: in a secure sum each vector then weighs 1, not n_k
        self.weighting = str(getattr(strategy, "weighting", "examples"))
        self.uniform = self.weighting == "uniform"
        if self.personalized and downlink is not None:
            raise RunError(f"{type(strategy).__name__} keeps each client's B and head on the client; downlink "
                           "compression is not built for it; turn it off")
        if self.personalized and settings.client_eval_every is None:
            raise RunError(f"{type(strategy).__name__} has no global model: each client's own model is evaluated on "
                           "its own held-out examples; set data.client_test_fraction > 0 (for example 0.2)")
        exact_start = str(getattr(strategy, "needs_global_start", "") or "")  # RoLoRA: why its start must be exact
        if downlink is not None and exact_start:
            raise RunError(f"{type(strategy).__name__} cannot take a compressed start: {exact_start}; "
                           "use downlink=none")
        if downlink is not None and (secure is not None or strategy.fresh_adapters):
            raise RunError("downlink compression needs a strategy whose clients continue from the global adapter "
                           "and no secure aggregation (each client starts from its own copy); use downlink=none")
        self.controlled = ctl.control_of(compressor)  # SCAFCOM: control variates (fedlora.core.control)
        if self.controlled is not None and (not getattr(strategy, "linear", False) or secure is not None
                                            or client_dp is not None or settings.participation.fedau):
            raise RunError(f"compression=scafcom needs a strategy whose aggregate is a weighted mean of what clients "
                           f"send ({type(strategy).__name__} is {'' if getattr(strategy, 'linear', False) else 'not '}"
                           "linear) and no secure aggregation, client-level DP or FedAU; use compression=compeft")
        if settings.participation.fedau and (client_dp is not None or secure is not None):
            raise RunError("participation.fedau rescales each client's update on the server, which client-level DP "
                           "and secure aggregation do not allow; turn one of them off")

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every round (from the checkpoint when resuming); write the adapter, plot and summary."""
        s = self.settings
        clients = self.transport.connect(s.num_clients, self.model.label_names, s.connect_timeout)
        self._check_stop(-1)
        ranks = {cid: c.rank for cid, c in clients.items()}
        r_max = max(ranks.values())
        if s.participation.bernoulli:
            self.online = s.participation.client_probabilities(clients, s.seed)
        self.sizes = {cid: c.num_examples for cid, c in clients.items()}  # FedAU's and SCAFCOM's full weights
        if s.participation.fedau:
            self.fedau = part.FedAUWeights(clients, s.participation.fedau_cutoff)
        state = self._resume(ranks) if s.resume else self._fresh(r_max)
        self.say(self._first_line(clients))
        for note in self.model.notes():
            self.say(note)
        try:
            if not s.resume:
                self._round_zero(state, ranks, r_max, clients)
            for server_round in range(state.round + 1, s.num_rounds + 1):
                self._check_stop(state.round)
                record = self.train_round(clients, state, server_round, r_max)
                state.best = self.model.metric.best([state.best, record.metrics[self.model.metric.key]])
                self.recorder.log_round(record)
                self._checkpoint(state, ranks)
                self._say_round(record)
            self._check_stop(state.round)
        finally:
            self.recorder.close()
        return self.finish(state, r_max)

    def _check_stop(self, last_round: int) -> None:
        """Raise :class:`RunInterrupted` when the run was asked to stop."""
        if self.stop.is_set():
            raise RunInterrupted(last_round)

    def _round_zero(self, state: ServerState, ranks: Mapping[int, int], r_max: int,
                    clients: Mapping[int, ClientInfo]) -> None:
        """Evaluate the initial global model (round 0; a personalized strategy's clients evaluate their start)
        and checkpoint it."""
        metrics, eval_seconds = self._evaluate(state, 0, r_max)
        client_eval = None
        if self.personalized:
            client_eval = self._evaluate_clients(clients, state, 0, r_max)
            metrics = self._personal_metrics(client_eval)
        state.best = metrics[self.model.metric.key]
        self.recorder.log_round(RoundRecord(0, metrics, None, self.elapsed(), eval_seconds=eval_seconds,
                                            client_eval=client_eval))
        self._checkpoint(state, ranks)
        m = self.model.metric
        self.say(f"round 0/{self.settings.num_rounds}: {self._metric_text(metrics)}" + _validation_text(m, metrics))
        if client_eval is not None:
            self.say(f"  {_client_eval_text(m, client_eval)}")

    # -- one round ----------------------------------------------------------------------------------
    def train_round(self, clients: Mapping[int, ClientInfo], state: ServerState, server_round: int,
                    r_max: int) -> RoundRecord:
        """Run round ``server_round``: update ``state`` and return the round's record."""
        s, t_round = self.settings, time.perf_counter()
        sampled = (part.participants(self.online, server_round, s.seed) if self.online else
                   sample_clients(sorted(clients), s.fraction_train, server_round, s.seed, s.min_clients))
        layout_rank = r_max if self.secure is not None else 0
        state.sent_views.clear()
        dp_secure = self._dp_secure(clients, state, server_round, r_max) if sampled else None
        assignments = {cid: self._assign(state, cid, clients[cid].rank, server_round, layout_rank, dp_secure)
                       for cid in sampled}
        packets = {cid: wire.encode_assignment(a) for cid, a in assignments.items()}
        previous = state.adapter
        rows: dict[int, ClientRow]
        skipped: str | None
        strategy_metrics: dict[str, float]
        ranks: list[int]
        if not sampled:  # participation=bernoulli: nobody was online
            rows, skipped, strategy_metrics, ranks = {}, "no client took part: the global adapter is kept", {}, []
            spent = self._charge_privacy(clients, state, rows)
        elif self.secure is not None:
            rows, skipped, strategy_metrics, ranks = self._secure_round(clients, state, server_round, r_max,
                                                                        assignments, packets)
            spent = self._charge_privacy(clients, state, rows)
            if self.client_dp is not None:
                spent = self.client_dp.epsilon(server_round)
        else:
            exchange = self.transport.exchange(server_round, packets, s.round_timeout)
            self._check_stop(state.round)  # a round cut short by a stop is not a round with failed clients
            rows, updates = self._collect(assignments, exchange, state)
            if self.controlled is not None:  # c moves by every accepted message, as each sender's c_k did
                messages = [self._message(exchange, u.client_id, assignments[u.client_id]) for u in updates]
                full = part.full_weights(self.weighting, self.sizes)
                state.control = ctl.advance_control(state.control, messages, [full[u.client_id] for u in updates],
                                                    self.controlled)
            spent = self._charge_privacy(clients, state, rows)
            if self.client_dp is not None:
                spent = self.client_dp.epsilon(server_round)
            skipped, strategy_metrics = self._aggregate(state, updates, server_round, assignments)
            ranks = [u.rank for u in updates]
        if self.fedau is not None:  # after the round's weights were read
            self.fedau.record({cid for cid, row in rows.items() if row.status == "ok"})
        slots, shared = slot_shares(previous, state.adapter, ranks)
        metrics, eval_seconds = self._evaluate(state, server_round, r_max)
        client_eval = None
        if self.personalized or s.client_eval_due(server_round):
            client_eval = self._evaluate_clients(clients, state, server_round, r_max)
        if self.personalized and client_eval is not None:
            metrics = self._personal_metrics(client_eval)
        state.round = server_round
        ok = [rows[c] for c in sorted(rows) if rows[c].status == "ok"]
        examples = sum(r.num_examples or 0 for r in ok)
        train_loss = sum((r.train_loss or 0.0) * (r.num_examples or 0) for r in ok) / examples if ok else None
        return RoundRecord(server_round, metrics, train_loss, self.elapsed(), eval_seconds=eval_seconds,
                           round_seconds=time.perf_counter() - t_round, clients=[rows[c] for c in sorted(rows)],
                           strategy=strategy_metrics, aggregation_skipped=skipped, slot_energy=slots,
                           shared_slot_energy=shared, dp_epsilon=spent, client_eval=client_eval)

    def _evaluate_clients(self, clients: Mapping[int, ClientInfo], state: ServerState, server_round: int,
                          r_max: int) -> ClientEvaluation:
        """Every connected client evaluates the global model (merged base + global adapter at ``r_max``, what
        the server evaluates) on the examples it holds out; their metrics, the mean over clients and the worst.

        The messages carry the adapter uncompressed and count as evaluation traffic, not as the method's.
        """
        t0 = time.perf_counter()
        transport = self.transport
        if not hasattr(transport, "evaluate_exchange"):
            raise RunError(f"{type(transport).__name__} cannot ask clients to evaluate; set "
                           "data.client_test_fraction=0")
        assignments = {}
        # a personalized strategy's last round: each client also saves its own model, which only it holds
        save_own = self.personalized and server_round == self.settings.num_rounds
        for cid in sorted(clients):
            pending = self._pending(state, cid)
            if self.personalized:  # its own model: the shared part at its rank, with the B and head it holds
                plan = self._personal(state, cid, self.strategy.plan(
                    state.adapter, state.strategy_state, client_id=cid, rank=clients[cid].rank,
                    server_round=server_round + 1, seed=self.settings.seed))
                start = lm.plan_start(plan, self.model.spec(plan.rank).modules)
            else:
                plan = ClientPlan(rank=r_max, adapter=state.adapter, init_seed=self.settings.seed)
                start = state.adapter
            assignments[cid] = wire.Assignment(server_round, plan, start, pending, self.resumed_from,
                                               save_own=save_own)
        packets = {cid: wire.encode_assignment(a) for cid, a in assignments.items()}
        exchange = cast(EvaluatingTransport, transport).evaluate_exchange(server_round, packets,
                                                                          self.settings.round_timeout)
        self._check_stop(state.round)
        rows: list[dict[str, Any]] = []
        for cid in sorted(clients):
            delivery = exchange.replies.get(cid)
            row: dict[str, Any] = {"client": cid, "bytes_down": int(exchange.bytes_down[cid])}
            if delivery is None or delivery.packet is None:
                row["error"] = self._no_answer(delivery)
            else:
                state.acked[cid] = len(state.merges)  # it applied every merge it was sent
                try:
                    values, count = wire.decode_evaluation(delivery.packet)
                except wire.WireError as exc:
                    row["error"] = str(exc)
                else:
                    row.update(values, num_examples=count)
                    saved = wire.saved_to(delivery.packet)
                    if saved is not None:
                        row[OWN_MODEL] = saved
            rows.append(row)
        return summarize_clients(rows, self.model.metric, time.perf_counter() - t0)

    @staticmethod
    def _pending(state: ServerState, cid: int) -> tuple[tuple[int, BaseMerge], ...]:
        """The base merges client ``cid`` has not applied yet, ``(index, merge)``."""
        return tuple((i, state.merges[i]) for i in range(state.acked.get(cid, 0), len(state.merges)))

    def _no_answer(self, delivery: Delivery | None) -> str:
        """Why a client's answer is missing: no reply in time, or the error it replied with."""
        if delivery is None:
            return f"no reply within round_timeout={self.settings.round_timeout:g} s"
        return delivery.error or "failed without a reason"

    def _personal(self, state: ServerState, cid: int, plan: ClientPlan) -> ClientPlan:
        """A personal plan for a client not known to hold its own ``B`` and head carries the plan's."""
        if plan.personal == PERSONAL_KEPT and cid not in state.personal:
            return dataclasses.replace(plan, personal=PERSONAL_START)
        return plan

    def _personal_metrics(self, evaluation: ClientEvaluation) -> dict[str, float]:
        """A personalized strategy's round metrics: the mean over clients of their own models on their own
        held-out examples (NaN when no client answered)."""
        return {self.model.metric.key: math.nan, "test_loss": math.nan, **evaluation.mean}

    def _charge_privacy(self, clients: Mapping[int, ClientInfo], state: ServerState,
                        rows: Mapping[int, ClientRow]) -> float | None:
        """Count the round against every client sent a training message; its epsilon goes in its row.

        A client counts whether or not its reply arrived (it may have trained): the spend is an upper
        bound. Returns the largest epsilon any client has spent so far (``None`` without privacy).
        """
        if self.privacy is None:
            return None
        for cid, row in rows.items():
            state.trained[cid] = state.trained.get(cid, 0) + 1
            row.epsilon = self.privacy.epsilon(clients[cid].num_examples, state.trained[cid])
        return max((self.privacy.epsilon(clients[cid].num_examples, n) for cid, n in state.trained.items()),
                   default=0.0)

    def _dp_secure(self, clients: Mapping[int, ClientInfo], state: ServerState, server_round: int, r_max: int,
                   ) -> tuple[AdapterState, float, int] | None:
        """Client-level DP under secure aggregation: what each client clips its change against (the global
        adapter's uplink tensors at the layout rank, :meth:`_wide_start`), the clip ``C`` and the weight
        ``W`` every vector enters the sum with (each client weighs the same; ``W`` keeps the quantization's
        resolution); ``None`` in every other round."""
        if self.secure is None or self.client_dp is None:
            return None
        start, keys = self._wide_start(state, server_round, r_max)
        weight = secure.max_weight([clients[c].num_examples for c in clients])
        return {k: start[k] for k in keys}, self.client_dp.level.clip, weight

    def _wide_start(self, state: ServerState, server_round: int, r_max: int) -> tuple[AdapterState, list[str]]:
        """The start of a client of rank ``r_max`` and the tensors it sends: a secure round's layout."""
        wide = self.strategy.plan(state.adapter, state.strategy_state, client_id=-1, rank=r_max,
                                  server_round=server_round, seed=self.settings.seed)
        start = lm.plan_start(wide, self.model.spec(r_max).modules)
        return start, wire.uplink_keys(wide, start)

    def _assign(self, state: ServerState, cid: int, rank: int, server_round: int,
                layout_rank: int = 0, dp_secure: tuple[AdapterState, float, int] | None = None) -> wire.Assignment:
        """Client ``cid``'s round: the strategy's plan, its start adapter, the merges it lacks (and in a
        secure round the rank its vector is padded to, and its quantization seed; with client-level DP
        too, the reference it clips against, the clip and its vector's weight: :meth:`_dp_secure`)."""
        plan = self._personal(state, cid, self.strategy.plan(state.adapter, state.strategy_state, client_id=cid,
                                                             rank=rank, server_round=server_round,
                                                             seed=self.settings.seed))
        modules = self.model.spec(rank).modules
        start = lm.plan_start(plan, modules)
        pending = self._pending(state, cid)
        quantization = seeds.secure_quantization(self.settings.seed, server_round, cid) if layout_rank else 0
        control = None
        at_rank: AdapterState = {}
        if self.controlled is not None:  # SCAFCOM: c at the client's rank, of every tensor it sends
            at_rank = lm.truncate_keys(state.control, rank)
            control = {k: at_rank[k] for k in wire.uplink_keys(plan, start)}
        send_control = self.controlled is not None and self.controlled.correct_drift
        down = planned = None
        if self.downlink is not None:  # the client starts from its copy, moved towards the plan's start
            target = {k: start[k] for k in wire.downlink_keys(plan, start)}
            if send_control:  # and towards c of the same tensors (one layout every round, RoLoRA's too)
                target = dl.with_control(target, {k: at_rank[k] for k in target})
            down = dl.encode(self.downlink, target, plan, modules, state.views.get(cid))
            state.sent_views[cid] = (server_round, down.view)
            view, held_control = dl.split_view(down.view)
            plan, planned = dataclasses.replace(plan, adapter=view, head={}), start  # its update goes on the plan's
            start = lm.plan_start(plan, modules)
            if held_control:  # it travels in the compressed copy; the client corrects (and the server decodes) with it
                control, send_control = wire.held_control(held_control, plan, start), False
        reference, clip, weight = dp_secure if dp_secure is not None else (
            None, 0.0, 1 if layout_rank and self.uniform else 0)  # 0: its example count
        return wire.Assignment(server_round, plan, start, pending, self.resumed_from, layout_rank, quantization, down,
                               control, send_control=send_control, planned=planned, secure_weight=weight,
                               clip_reference=reference, clip=clip)

    def _secure_round(self, clients: Mapping[int, ClientInfo], state: ServerState, server_round: int, r_max: int,
                      assignments: Mapping[int, wire.Assignment], packets: Mapping[int, wire.Packet],
                      ) -> tuple[dict[int, ClientRow], str | None, dict[str, float], list[int]]:
        """A round under secure aggregation: the rows (reports in the clear), why the global adapter was
        kept (``None``: replaced), the strategy's metrics (none: they would describe one update) and the
        ranks of the clients in the sum.

        The strategy aggregates one update, the weighted mean of the clients' vectors
        (:mod:`fedlora.core.secure`); per-client checks of an update (shape, finiteness, ``max_norm_ratio``)
        cannot see a masked vector: each client checks its own before it sends.
        """
        assert self.secure is not None
        transport = self.transport
        if not hasattr(transport, "secure_exchange"):
            raise RunError(f"{type(transport).__name__} cannot run secure aggregation; run on Flower (simulation "
                           "or deployment)")
        start, keys = self._wide_start(state, server_round, r_max)
        for cid, a in assignments.items():
            if wire.uplink_keys(a.plan, a.start) != keys:
                raise RunError(f"secure aggregation: client {cid} would send {wire.uplink_keys(a.plan, a.start)}, "
                               f"a client of rank {r_max} {keys}; {type(self.strategy).__name__} cannot be summed")
        # W, what every vector's weight is divided by: 1 when each weighs 1 (a uniform strategy, without DP)
        weight = 1 if self.uniform and self.client_dp is None else secure.max_weight(
            [clients[c].num_examples for c in clients])
        sx: SecureExchange = cast(SecureTransport, transport).secure_exchange(
            server_round, packets, self.settings.round_timeout, self.secure, weight,
            seed=seeds.secure_ring(self.settings.seed, server_round).getrandbits(62))
        self._check_stop(state.round)
        rows: dict[int, ClientRow] = {}
        for cid in sorted(assignments):
            rows[cid] = row = ClientRow(client=cid, rank=assignments[cid].plan.rank,
                                        bytes_down=int(sx.bytes_down.get(cid, 0)))
            row.bytes_up = int(sx.bytes_up.get(cid, 0))
            if cid in sx.reports:
                state.acked[cid] = len(state.merges)
                if assignments[cid].plan.personal:  # it kept what it trained before it replied (FedSA-LoRA)
                    state.personal.add(cid)
                try:
                    report = wire.decode_report(sx.reports[cid].metrics)
                except (KeyError, ValueError, TypeError) as exc:  # its vector is in the sum all the same
                    row.error = f"its report could not be read ({type(exc).__name__}: {exc})"
                    continue
                row.num_examples, row.train_loss = report.num_examples, report.train_loss
                row.train_seconds, row.base_version = report.train_seconds, report.base_version
            else:
                row.fail(sx.dropped.get(cid) or sx.failure or "not in the secure sum")
                if wire.PERSONAL_LOST in (row.error or ""):  # it holds no B and head of its own: send the plan's
                    state.personal.discard(cid)
        in_sum = sorted(sx.reports)
        ranks = [assignments[c].plan.rank for c in in_sum]
        min_fit = self.settings.min_fit_clients
        if sx.weighted_sum is None:
            return rows, f"secure aggregation failed: {sx.failure}; the global adapter is kept", {}, []
        if len(in_sum) < min_fit:
            return rows, (f"{len(in_sum)} update(s) in the secure sum, fewer than min_fit_clients={min_fit}: the "
                          "global adapter is kept"), {}, []
        plan = secure.layout({k: tuple(start[k].shape) for k in keys}, r_max)
        mean = secure.mean_update(torch.from_numpy(sx.weighted_sum), sx.total_weight, plan, start,
                                  scaling=self.model.scaling(r_max))
        result = self.strategy.aggregate(state.adapter, state.strategy_state, [mean], server_round=server_round)
        if result.merge is not None:
            raise RunError(f"{type(self.strategy).__name__} merged into the base under secure aggregation; only a "
                           "linear strategy may run with privacy.secure=true")
        adapter = result.adapter
        if self.client_dp is not None:  # each vector is its client's clipped change, weighing W: add the noise
            clipped = secure.unembed(torch.from_numpy(sx.weighted_sum) / weight, plan)  # sum_k W x_k / W
            generator = torch.Generator().manual_seed(seeds.client_dp_noise(self.settings.seed, server_round))
            adapter = release(state.adapter, clipped, keys, self.client_dp.level, generator)
        if not validation.is_finite_state(adapter):
            return rows, "the aggregate of the secure sum is not finite: the global adapter is kept", {}, []
        state.adapter, state.strategy_state = adapter, dict(result.state)
        return rows, None, {}, ranks

    def _collect(self, assignments: Mapping[int, wire.Assignment], exchange: Exchange, state: ServerState,
                 ) -> tuple[dict[int, ClientRow], list[ClientUpdate]]:
        """Each sampled client's row, and the updates that passed every check (in client order).

        A client is ``failed`` for an error reply or no reply in time, ``rejected`` for a reply that
        cannot be decoded, fails :func:`fedlora.core.validation.check_update` against what it was
        sent, or moves far more than the others (``max_norm_ratio``).
        """
        rows: dict[int, ClientRow] = {}
        accepted: dict[int, ClientUpdate] = {}
        for cid in sorted(assignments):
            rows[cid] = row = ClientRow(client=cid, rank=assignments[cid].plan.rank,
                                        bytes_down=int(exchange.bytes_down[cid]))
            update = self._check_reply(row, assignments[cid], exchange, state)
            if update is not None:
                accepted[cid] = update
        # at the rank each update has (smaller than planned for a client that pruned: HetLoRA)
        norms = {cid: validation.change_norm(u.state, wire.base(wire.at_rank(assignments[cid], u.rank)))
                 for cid, u in accepted.items()}
        # under client-level DP, clipping bounds each client; a rejection that depends on the others' norms would not
        ratio = None if self.client_dp is not None else self.settings.max_norm_ratio
        for cid, reason in validation.norm_outliers(norms, ratio).items():
            rows[cid].reject(reason)
            del accepted[cid]
        return rows, [accepted[c] for c in sorted(accepted)]

    def _check_reply(self, row: ClientRow, assignment: wire.Assignment, exchange: Exchange,
                     state: ServerState) -> ClientUpdate | None:
        """Fill ``row`` from the client's reply; return its update if it is well-formed."""
        delivery = exchange.replies.get(row.client)
        if delivery is None or delivery.packet is None:
            row.fail(self._no_answer(delivery))
            error = (delivery.error if delivery is not None else None) or ""
            if dl.LOST in error:  # it holds no copy the server knows: start it again
                state.views.pop(row.client, None)
            if wire.PERSONAL_LOST in error:  # it holds no B and head of its own: send the plan's
                state.personal.discard(row.client)
            return None
        state.acked[row.client] = len(state.merges)  # it applied every merge it was sent
        if assignment.plan.personal:  # it kept what it trained before it replied
            state.personal.add(row.client)
        if row.client in state.sent_views:  # and holds the copy of its start it was sent
            state.views[row.client] = state.sent_views.pop(row.client)
        row.bytes_up = delivery.bytes_up
        try:
            received, report = wire.decode_reply(delivery.packet, assignment, self.compressor)
        except wire.WireError as exc:
            row.reject(str(exc))
            return None
        assignment = wire.as_trained(assignment, report)  # a client that pruned its rank (HetLoRA) replies at it
        rank = row.rank = assignment.plan.rank
        reason = validation.check_update(wire.uplink_shapes(assignment), received, rank, report.rank)
        if reason is not None:
            row.reject(reason)
            return None
        row.num_examples, row.train_loss = report.num_examples, report.train_loss
        row.train_seconds, row.base_version = report.train_seconds, report.base_version
        return ClientUpdate(row.client, rank, self.model.scaling(rank), report.num_examples,
                            wire.complete(received, wire.base(assignment)))

    def _message(self, exchange: Exchange, cid: int, assignment: wire.Assignment) -> AdapterState:
        """Client ``cid``'s accepted controlled reply, decoded: its message ``d_k``."""
        packet = exchange.replies[cid].packet
        if packet is None or self.compressor is None:
            raise RunError(f"client {cid}'s update was accepted without a compressed reply")
        return wire.compressed_message(packet, assignment, self.compressor)

    def _aggregate(self, state: ServerState, updates: Sequence[ClientUpdate], server_round: int,
                   assignments: Mapping[int, wire.Assignment]) -> tuple[str | None, dict[str, float]]:
        """Adopt the strategy's aggregate when enough updates arrived and it is finite.

        Returns why the global adapter was kept (``None``: it was replaced) and the strategy's metrics.
        """
        min_fit = self.settings.min_fit_clients
        if len(updates) < min_fit:
            return (f"{len(updates)} valid update(s), fewer than min_fit_clients={min_fit}: the global adapter "
                    "is kept"), {}
        extra: dict[str, float] = {}
        if self.client_dp is not None:
            result = self._private_aggregate(state, updates, server_round, assignments)
        else:
            if self.fedau is not None:
                updates, extra = self._fedau_rescale(updates, assignments)
            result = self.strategy.aggregate(state.adapter, state.strategy_state, updates, server_round=server_round)
        merge_tensors = [t for pair in (result.merge or {}).values() for t in pair]
        if not validation.is_finite_state(result.adapter) or not all(bool(t.isfinite().all()) for t in merge_tensors):
            return "aggregation produced non-finite values: the global adapter is kept", {}
        state.adapter, state.strategy_state = result.adapter, dict(result.state)
        if result.merge is not None:
            merge = result.merge
            if self.merge_downlink is not None:  # the truncated merge is the round's merge, for every model
                merge, state.merge_residual, sent = self.merge_downlink.compress_merge(merge, state.merge_residual)
                extra.update(sent)
            state.merges.append(merge)
        return None, {**{k: float(v) for k, v in result.metrics.items()}, **extra}

    def _fedau_rescale(self, updates: Sequence[ClientUpdate], assignments: Mapping[int, wire.Assignment],
                       ) -> tuple[list[ClientUpdate], dict[str, float]]:
        """The updates rescaled so that the strategy's weighted mean is FedAU's ``x + sum omega_k w_k Delta_k``
        (:mod:`fedlora.core.participation`), and the round's FedAU metrics (``fedau_step``: ``sum omega_k w_k``,
        1 in expectation)."""
        assert self.fedau is not None
        p = lm.participant_weights(self.weighting, [u.num_examples for u in updates])
        full = part.full_weights(self.weighting, self.sizes)
        omegas = [self.fedau.weight(u.client_id) for u in updates]
        w = [full[u.client_id] for u in updates]
        factors = part.fedau_factors(omegas, w, p)
        fresh = self.strategy.fresh_adapters
        scaled = [part.rescale(u, wire.base(assignments[u.client_id]), c, keep_lora_a=fresh)
                  for u, c in zip(updates, factors, strict=True)]
        step = sum(o * x for o, x in zip(omegas, w, strict=True))
        return scaled, {"fedau_weight_max": max(omegas), "fedau_step": step}

    def _private_aggregate(self, state: ServerState, updates: Sequence[ClientUpdate], server_round: int,
                           assignments: Mapping[int, wire.Assignment]) -> AggregateResult:
        """Client-level DP (:func:`fedlora.core.privacy.private_mean`) over the strategy's per-client images.

        Each image is the strategy's aggregate of one update alone (a ``linear`` strategy's aggregate is
        their weighted mean); the noise covers every tensor a plan let a client send. A linear strategy
        keeps no state that depends on the updates and merges nothing into the base.
        """
        assert self.client_dp is not None
        images = [self.strategy.aggregate(state.adapter, state.strategy_state, [u], server_round=server_round)
                  for u in updates]
        if any(image.merge is not None for image in images):
            raise RunError(f"{type(self.strategy).__name__} merged into the base under client-level DP; only a "
                           "linear strategy may run with privacy=dp_fedavg")
        noised = {k for a in assignments.values() for k in wire.uplink_keys(a.plan, a.start)}
        generator = torch.Generator().manual_seed(seeds.client_dp_noise(self.settings.seed, server_round))
        adapter, metrics = private_mean(state.adapter, [image.adapter for image in images], noised,
                                        self.client_dp.level, generator)
        return AggregateResult(adapter=adapter, state=dict(images[-1].state), metrics=metrics)

    def _evaluate(self, state: ServerState, server_round: int, r_max: int) -> tuple[dict[str, float], float]:
        """The global model's metrics (merged base + global adapter) and the seconds it took (nothing for a
        personalized strategy, which has no global model: its clients evaluate their own)."""
        if self.personalized:
            return {}, 0.0
        t_eval = time.perf_counter()
        metrics = self.model.evaluate(server_round, state.adapter, r_max, state.merges)
        return metrics, time.perf_counter() - t_eval

    # -- start, resume, checkpoint ------------------------------------------------------------------
    def _fresh(self, r_max: int) -> ServerState:
        """The strategy's round-0 state; clear what an earlier run may have left in the directory."""
        for name in (ckpt.CHECKPOINT_DIR, ckpt.CLIENT_STATE_DIR):
            shutil.rmtree(self.run_dir / name, ignore_errors=True)
        (self.run_dir / METRICS_FILE).unlink(missing_ok=True)
        truncate_generations(self.run_dir, -1)
        init = self.strategy.init(self.model.spec(r_max), self.settings.seed)
        control = ({k: torch.zeros_like(v, dtype=torch.float32) for k, v in init.adapter.items()}
                   if self.controlled is not None else {})
        return ServerState(adapter=init.adapter, strategy_state=dict(init.state), control=control)

    def _resume(self, ranks: Mapping[int, int]) -> ServerState:
        """The checkpoint's state; ``metrics.jsonl`` and the random-number state as they were then.

        Which merges the clients hold is forgotten: their processes are new, so the next message to
        each resends every base merge.
        """
        saved = ckpt.load_checkpoint(self.run_dir)
        if saved.ranks != dict(ranks):
            raise RunError(f"resume: the connected clients' ranks differ from the checkpoint's "
                               f"({describe_rank_change(saved.ranks, ranks)}); resume with the same clients "
                               f"and rank settings")
        self.merges_saved = len(saved.merges)
        self.resumed_from = saved.round
        self.start_wall = time.perf_counter() - saved.elapsed
        ckpt.write_atomic(self.run_dir / METRICS_FILE, "".join(x + "\n" for x in saved.metrics).encode())
        truncate_generations(self.run_dir, saved.round)
        ckpt.restore_rng(saved.rng, saved.rng.get("torch"))
        trained: dict[int, int] = {}
        took_part: list[set[int]] = []
        personal: set[int] = set()
        for line in filter(str.strip, saved.metrics):
            record = RoundRecord.from_dict(json.loads(line))
            for row in record.clients:
                trained[row.client] = trained.get(row.client, 0) + 1
                if self.personalized and row.status in ("ok", "rejected"):  # its reply arrived: it kept its own
                    personal.add(row.client)
                elif self.personalized and wire.PERSONAL_LOST in (row.error or ""):
                    personal.discard(row.client)
            if record.round >= 1:
                took_part.append({row.client for row in record.clients if row.status == "ok"})
        if self.fedau is not None:  # FedAU's state is a function of who took part: replay it
            self.fedau = part.FedAUWeights.replay(self.fedau.absent, self.fedau.cutoff, took_part)
        return ServerState(adapter=saved.adapter, strategy_state=dict(saved.strategy_state), round=saved.round,
                           best=saved.best, merges=list(saved.merges), trained=trained, views=dict(saved.views),
                           personal=personal, control=dict(saved.control),
                           merge_residual=dict(saved.merge_residual))

    def _checkpoint(self, state: ServerState, ranks: Mapping[int, int]) -> None:
        """Write the checkpoint of the last complete round (see :mod:`fedlora.results.checkpoint`)."""
        if not self.settings.checkpoint:
            return
        lines = (self.run_dir / METRICS_FILE).read_text().splitlines()
        saved = ckpt.Checkpoint(round=state.round, adapter=state.adapter, strategy_state=dict(state.strategy_state),
                                merges=state.merges, ranks=dict(ranks), acked=dict(state.acked), best=state.best,
                                elapsed=self.elapsed(), metrics=lines, views=dict(state.views),
                                control=dict(state.control), merge_residual=dict(state.merge_residual))
        ckpt.save_checkpoint(self.run_dir, saved, merges_from=self.merges_saved)
        self.merges_saved = len(state.merges)

    def elapsed(self) -> float:
        """Seconds of run time so far (across resumes)."""
        return time.perf_counter() - self.start_wall

    # -- the end ------------------------------------------------------------------------------------
    def finish(self, state: ServerState, r_max: int) -> dict[str, Any]:
        """Save the global adapter (base merges folded in), plot, write ``summary.json``."""
        metric, last = self.model.metric, read_records(self.run_dir)
        if self.settings.num_rounds and not any(r.round >= 1 and r.aggregation_skipped is None for r in last):
            raise NoProgress(f"no round aggregated an update: every one of the {self.settings.num_rounds} rounds kept "
                             "the global adapter (too few valid updates, or a non-finite aggregate; each client's "
                             f"status and error are in {self.run_dir / METRICS_FILE}); the adapter was not saved")
        folded, rank, alpha = lm.fold_for_peft(state.adapter, self.model.scaling(r_max), state.merges,
                                               self.model.alpha(r_max))
        saved = self.model.save(folded, rank, alpha)
        plot = plot_run(self.run_dir, title=self.settings.name, metric=metric)
        summary = {
            "name": self.settings.name, "strategy": type(self.strategy).__name__,
            **self._compression_summary(),
            "num_rounds": self.settings.num_rounds, "num_clients": self.settings.num_clients,
            **final_metrics(metric, last[-1].metrics, state.best),
            **client_summary(metric, last[-1].client_eval),
            # no global model: final_<metric> is the mean over clients of their own models on their own data
            **({"personalized": True} if self.personalized else {}),
            "wall_time_seconds": self.elapsed(),
            "bytes_up_total": sum(r.bytes_total("up") for r in last),
            "bytes_down_total": sum(r.bytes_total("down") for r in last),
            **({"dp_epsilon": max((r.dp_epsilon or 0.0) for r in last), "dp_delta": self.privacy.delta,
                "dp_level": "example"} if self.privacy is not None else {}),
            **({"dp_epsilon": max((r.dp_epsilon or 0.0) for r in last), "dp_delta": self.client_dp.delta,
                "dp_level": "client"} if self.client_dp is not None else {}),
            **saved, "adapter_rank": rank, "adapter_lora_alpha": alpha, "base_merges": len(state.merges),
            "plot": str(plot), "label_names": list(self.model.label_names),
        }
        if self.personalized:  # the models scored: each saved by its client, where only it holds its B and head
            evaluation = last[-1].client_eval
            rows = evaluation.clients if evaluation is not None else []
            summary["client_adapters"] = {str(r["client"]): r[OWN_MODEL] for r in rows if OWN_MODEL in r}
            kept = summary["client_adapters"]
            self.say(f"each client's own model (its B and head with the shared A), saved by {len(kept)} of "
                     f"{len(rows)} clients where each keeps its state" + (f", e.g. {next(iter(kept.values()))}"
                                                                         if kept else ""))
        write_summary(self.run_dir, summary)
        name = f"mean {metric.name} of the clients' own models" if self.personalized else metric.name
        self.say(f"done: final {name} {last[-1].metrics[metric.key]:.4f} (best {state.best:.4f}) in "
                 f"{summary['wall_time_seconds']:.0f} s; outputs in {self.run_dir}")
        return summary

    # -- words --------------------------------------------------------------------------------------
    def _compression_summary(self) -> dict[str, Any]:
        comp = self.compressor
        return {"compression": type(comp).__name__ if comp else None,
                "error_feedback": bool(comp.error_feedback) if comp else None,
                "error_feedback_tensors": feedback_scope(comp, self.strategy),
                "downlink_compression": type(self.downlink or self.merge_downlink).__name__
                if self.downlink or self.merge_downlink else None}

    def _first_line(self, clients: Mapping[int, ClientInfo]) -> str:
        text = f"{self.transport.describe(clients)}; strategy {type(self.strategy).__name__}"
        if self.compressor is not None:
            scope = feedback_scope(self.compressor, self.strategy)
            words = (f"error feedback {'on' if scope == 'all' else 'off'}" if scope in ("all", "none") else
                     "error feedback on for the tensors that continue from the global adapter (a classifier "
                     "head); not for the LoRA factors, which start fresh every round")
            name = type(self.compressor).__name__
            if self.controlled is not None:
                c = self.controlled
                random_k = getattr(self.compressor, "codec_name", "") == "rand_k"
                name = (("SCALLION (random-k)" if random_k else name) if c.correct_drift else
                        f"EF21 ({'random-k' if random_k else 'ComPEFT'}-coded)")
                words = (f"control variates, momentum {c.momentum:g}, control step {c.control_step:g}, server step "
                         f"{c.server_lr:g}; c_k is the error feedback" if c.correct_drift else
                         f"EF21 error feedback: each client's c_k tracks its update, momentum {c.momentum:g}, server "
                         f"step {c.server_lr:g}; no drift correction")
            text += f" + {name} ({words})"
        if self.merge_downlink is not None:
            text += (f"; downlink {type(self.merge_downlink).__name__} (each base merge truncated to rank "
                     f"{getattr(self.merge_downlink, 'rank', '?')}, the rest kept on the server for the next)")
        if self.downlink is not None:
            held = "start and of c" if self.controlled is not None and self.controlled.correct_drift else "start"
            text += f"; downlink {type(self.downlink).__name__} (each client's copy of its {held}, EF21)"
        if self.privacy is not None:
            text += f"; {self.privacy.describe([c.num_examples for c in clients.values()])}"
        if self.secure is not None:
            sec = self.secure
            text += (f"; secure aggregation (SecAgg+, {sec.num_shares} shares, threshold {sec.threshold}, entries "
                     f"clipped to +-{sec.clipping_range:g} and quantized to {sec.quantization_range} levels; the "
                     "server sees only the sum, so no per-client check: each client checks its own update"
                     + (f", and max_norm_ratio={self.settings.max_norm_ratio:g} is not applied)"
                        if self.settings.max_norm_ratio is not None else ")"))
        if self.online or self.fedau is not None:
            text += f"; {self.settings.participation.describe(self.online, len(clients))}"
        if self.client_dp is not None:
            text += f"; {self.client_dp.describe()}"
            if self.settings.max_norm_ratio is not None:
                text += (f" (max_norm_ratio={self.settings.max_norm_ratio:g} is not applied: clipping bounds each "
                         "client, and a rejection that depends on the other clients' norms would not)")
        text += f"; {self.settings.num_rounds} rounds"
        every = self.settings.client_eval_every
        if self.personalized:
            text += ("; each client keeps its own B and head: no global model, every client evaluates its own "
                     "model on its own held-out examples every round")
        elif every is not None:
            when = f"every {every} rounds and after the last" if every else "after the last round"
            text += f"; every client evaluates the global model on its own held-out examples {when}"
        return text + (f"; resuming after round {self.resumed_from}" if self.resumed_from else "")

    def _metric_text(self, metrics: Mapping[str, float]) -> str:
        """``test accuracy 0.9012, loss 0.3141``; a personalized strategy's says whose models they are."""
        m = self.model.metric
        text = f"{m.name} {metrics[m.key]:.4f}, loss {metrics['test_loss']:.4f}"
        return f"clients' own models, mean {text}" if self.personalized else text

    def _say_round(self, record: RoundRecord) -> None:
        """Print the one-line summary of a round."""
        m, r, loss = self.model.metric, record, record.train_loss
        problems = "".join(f", {n} {status}" for status in ("failed", "rejected") if (n := r.count(status)))
        skipped = " (aggregation skipped)" if r.aggregation_skipped else ""
        self.say(f"round {r.round}/{self.settings.num_rounds}: {self._metric_text(r.metrics)}"
                 f"{_validation_text(m, r.metrics)}, "
                 f"train loss {loss if loss is None else round(loss, 4)}, "
                 f"{r.num_ok} client{'s' if r.num_ok != 1 else ''}{problems}{skipped}, "
                 f"up {r.bytes_total('up') / 1e6:.2f} MB, "
                 f"down {r.bytes_total('down') / 1e6:.2f} MB, {r.round_seconds or 0.0:.1f} s "
                 f"(elapsed {r.wall_time:.0f} s)"
                 + (f", max epsilon {r.dp_epsilon:.2f}" if r.dp_epsilon is not None else ""))
        if r.client_eval is not None:
            self.say(f"  {_client_eval_text(m, r.client_eval)}")
        trouble = [c for c in r.clients if c.status != "ok"]
        if trouble:  # the first reason on the console; every client's in metrics.jsonl
            first = trouble[0]
            reason = (first.error or "no reason given").strip().splitlines()[0][:200]
            more = (f" (and {len(trouble) - 1} more; each client's reason is in {METRICS_FILE})"
                    if len(trouble) > 1 else "")
            self.say(f"  client {first.client} {first.status}: {reason}{more}")


def client_summary(metric: Metric, evaluation: ClientEvaluation | None) -> dict[str, Any]:
    """The summary's per-client entries of the last round: ``client_mean_<metric>``, ``client_worst_<metric>``,
    ``client_worst_id`` (empty without per-client evaluation)."""
    if evaluation is None:
        return {}
    return {f"client_mean_{metric.key}": evaluation.mean.get(metric.key),
            f"client_worst_{metric.key}": evaluation.worst, "client_worst_id": evaluation.worst_client,
            "client_eval_failed": evaluation.num_failed}


def _client_eval_text(metric: Metric, evaluation: ClientEvaluation) -> str:
    """``clients' own held-out data: mean test accuracy 0.8812, worst 0.6000 (client 7); 10 clients, 1.2 s``."""
    answered = len(evaluation.clients) - evaluation.num_failed
    if evaluation.worst is None:
        return f"clients' own held-out data: no client answered ({evaluation.num_failed} failed)"
    failed = f", {evaluation.num_failed} failed" if evaluation.num_failed else ""
    return (f"clients' own held-out data: mean {metric.name} {evaluation.mean[metric.key]:.4f}, worst "
            f"{evaluation.worst:.4f} (client {evaluation.worst_client}); {answered} clients{failed}, "
            f"{evaluation.eval_seconds:.1f} s")


def _validation_text(metric: Metric, metrics: Mapping[str, float]) -> str:
    """``", validation 0.9213"`` when the run holds a validation split (``data.validation_fraction``)."""
    key = metric.validation
    return f", validation {metrics[key]:.4f}" if key in metrics else ""
