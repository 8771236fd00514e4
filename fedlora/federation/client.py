"""A client's side of a round, without Flower: decode the assignment, train, encode the reply.

:func:`train_round` is what every client runs for a training message, whatever carries it: the
Flower ClientApp (:mod:`fedlora.flower.client_app`, in simulation and deployment) and the in-process
transports (:mod:`fedlora.federation.memory`). It keeps what must survive between rounds in a
:class:`ClientStore` (the base merges it applied, the compression residual, the copies of its start
that a compressed downlink is relative to), trains through a
:class:`Trainer` (the runtime's model and data; :mod:`fedlora.serving.runtime`) and injects the
faults the run asks for (:mod:`fedlora.core.faults`): it may fail (raise), straggle (sleep), or send
a malformed update, always uncompressed, so that the server's checks see exactly the defect.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from fedlora.core import control as ctl
from fedlora.core import lora_math as lm
from fedlora.core import privacy, secure, seeds
from fedlora.core.faults import FaultSettings, InjectedFault, corrupt_state, decide
from fedlora.core.types import PERSONAL_KEPT, AdapterState, BaseMerge, Compressor, Payload, RankPruning, Tensor
from fedlora.federation import downlink as dl
from fedlora.federation import wire


class Trainer(Protocol):
    """The runtime of one client process: its model and data (one instance serves many clients)."""

    def modules(self) -> Mapping[str, tuple[int, int]]:
        """The adapted modules: name -> ``(m, n)``."""
        ...

    def num_examples(self, client_id: int) -> int:
        """How many training examples client ``client_id`` holds."""
        ...

    def train(self, client_id: int, assignment: wire.Assignment, merges: Sequence[BaseMerge],
              ) -> tuple[AdapterState, float]:
        """Train from ``assignment.start`` on the base plus ``merges``; return the trained adapter and mean loss.

        A plan with ``prune`` (HetLoRA) asks for its rank regulariser in the loss; the pruning itself is
        decided here, after training (:func:`self_pruned_rank`)."""
        ...

    def evaluate(self, client_id: int, assignment: wire.Assignment, merges: Sequence[BaseMerge],
                 ) -> tuple[dict[str, float], int]:
        """The task's metrics of ``assignment.start`` (on the base plus ``merges``) on the examples client
        ``client_id`` holds out (``data.client_test_fraction``), and how many there are."""
        ...

    def save(self, path: Path, adapter: AdapterState, rank: int, merges: Sequence[BaseMerge]) -> None:
        """Save ``adapter`` (at ``rank``, on the base plus ``merges``, which it folds in) in peft's format at
        ``path``, loadable on the pristine base model."""
        ...


class ClientStore(Protocol):
    """What one client keeps between its rounds."""

    def merges(self) -> list[tuple[int, BaseMerge]]:
        """The base merges it has applied, ``(index, merge)`` in order."""
        ...

    def set_merges(self, merges: list[tuple[int, BaseMerge]]) -> None:
        """Replace the base merges it has applied."""
        ...

    def residual(self, resume_round: int) -> AdapterState | None:
        """Its compression residual; in a resumed run (``resume_round > 0``) from disk if need be."""
        ...

    def save_residual(self, server_round: int, residual: AdapterState) -> None:
        """Keep the residual left after ``server_round`` (and write it where a kill cannot lose it)."""
        ...

    def views(self, resume_round: int) -> dict[int, AdapterState]:
        """The copies of its start it holds, by round (:mod:`fedlora.federation.downlink`); in a resumed
        run from disk if need be."""
        ...

    def save_views(self, server_round: int, views: dict[int, AdapterState]) -> None:
        """Keep these copies after ``server_round``'s message (and write them where a kill cannot lose them)."""
        ...

    def personal(self, resume_round: int) -> dict[int, AdapterState]:
        """Its own ``B`` and head (a personal plan: FedSA-LoRA), by the round it trained them; in a resumed run
        from disk if need be."""
        ...

    def save_personal(self, server_round: int, own: dict[int, AdapterState]) -> None:
        """Keep these after ``server_round`` (and write them where a kill cannot lose them)."""
        ...

    def model_dir(self) -> Path | None:
        """Where this client saves its own model when the server asks (a personalized strategy's last round),
        beside the state it keeps; ``None``: it keeps nothing on disk, and saves nothing."""
        ...


@dataclass
class MemoryStore:
    """A :class:`ClientStore` in a dict (in-process clients; nothing survives the process)."""

    applied: list[tuple[int, BaseMerge]] = field(default_factory=list)
    kept: AdapterState | None = None
    copies: dict[int, AdapterState] = field(default_factory=dict)
    own: dict[int, AdapterState] = field(default_factory=dict)
    saves_to: Path | None = None  # where :meth:`model_dir` says it saves its own model (None: nowhere)

    def merges(self) -> list[tuple[int, BaseMerge]]:
        """The merges applied so far."""
        return list(self.applied)

    def set_merges(self, merges: list[tuple[int, BaseMerge]]) -> None:
        """Replace the merges applied so far."""
        self.applied = list(merges)

    def residual(self, resume_round: int) -> AdapterState | None:  # noqa: ARG002 - nothing on disk
        """The residual kept in memory."""
        return self.kept

    def save_residual(self, server_round: int, residual: AdapterState) -> None:  # noqa: ARG002
        """Keep the residual in memory."""
        self.kept = residual

    def views(self, resume_round: int) -> dict[int, AdapterState]:  # noqa: ARG002 - nothing on disk
        """The copies kept in memory."""
        return dict(self.copies)

    def save_views(self, server_round: int, views: dict[int, AdapterState]) -> None:  # noqa: ARG002
        """Keep the copies in memory."""
        self.copies = dict(views)

    def personal(self, resume_round: int) -> dict[int, AdapterState]:  # noqa: ARG002 - nothing on disk
        """Its own ``B`` and head kept in memory."""
        return dict(self.own)

    def save_personal(self, server_round: int, own: dict[int, AdapterState]) -> None:  # noqa: ARG002
        """Keep them in memory."""
        self.own = dict(own)

    def model_dir(self) -> Path | None:
        """``saves_to``."""
        return self.saves_to


@dataclass(frozen=True)
class ClientSide:
    """What a client process needs for every training message; built once per process."""

    trainer: Trainer
    compressor: Compressor | None = None
    faults: FaultSettings = field(default_factory=FaultSettings)
    seed: int = 0  # the run seed (fault decisions)
    downlink: Compressor | None = None  # decodes a compressed start (downlink=compeft)


def apply_merges(store: ClientStore, incoming: Sequence[tuple[int, BaseMerge]]) -> list[BaseMerge]:
    """Append the merges this client has not applied yet; return all of them, in order.

    A merge it already holds (a resend after the server resumed) is skipped; a gap is an error.
    """
    history = store.merges()
    for index, merge in incoming:
        if index < len(history):
            continue
        if index != len(history):
            raise RuntimeError(f"base merge {index} arrived but this client holds only {len(history)}")
        history.append((index, merge))
    if incoming:
        store.set_merges(history)
    return [m for _, m in history]


def with_own(assignment: wire.Assignment, store: ClientStore, before: int) -> wire.Assignment:
    """``assignment`` with the client's own ``B`` and head in its start, under a personal plan (FedSA-LoRA).

    The client uses the newest it kept from a round before ``before`` (training in round ``t``: before ``t``;
    evaluating after round ``t``: before ``t + 1``), so that a round run again after a resume starts where it
    did the first time; a client that holds none takes the plan's (:data:`~fedlora.core.types.PERSONAL_START`).

    Raises
    ------
    RuntimeError
        Naming :data:`~fedlora.federation.wire.PERSONAL_LOST`, when the plan says the client keeps its own and
        it holds none.
    """
    plan = assignment.plan
    if not plan.personal:
        return assignment
    own = store.personal(assignment.resume_round)
    rounds = [r for r in own if r < before]
    if rounds:
        start = {**assignment.start, **own[max(rounds)]}
    elif plan.personal == PERSONAL_KEPT:
        raise RuntimeError(f"{wire.PERSONAL_LOST}: the server expects this client to hold its own B and head "
                           f"(FedSA-LoRA) from before round {before}, and it holds none; the server starts it again "
                           "from its plan")
    else:
        start = assignment.start
    return dataclasses.replace(assignment, start=start)


def keep_own(store: ClientStore, resume_round: int, server_round: int, trained: Mapping[str, Tensor]) -> None:
    """Keep the ``B`` and head trained in ``server_round`` and the newest from before it (what a rerun of
    ``server_round`` after a resume starts from); older ones go."""
    own = store.personal(resume_round)
    older = [r for r in own if r < server_round]
    kept = {max(older): own[max(older)]} if older else {}
    kept[server_round] = {k: v.detach().clone() for k, v in trained.items() if lm.is_personal_key(k)}
    store.save_personal(server_round, kept)


def train_round(packet: wire.Packet, client_id: int, side: ClientSide, store: ClientStore) -> wire.Packet:
    """Handle one training message: the reply packet (raises for an injected failure)."""
    t0 = time.perf_counter()
    assignment = wire.decode_assignment(packet, side.trainer.modules(), downlink=side.downlink, views=store.views)
    assignment = with_own(assignment, store, before=assignment.server_round)
    reply = _train_and_encode(assignment, client_id, side, store, t0)
    down = assignment.downlink
    if down is not None:  # the server moves its mirror when this reply arrives: keep the new copy first
        views = store.views(assignment.resume_round)  # and every one the server may still name, if it does not
        store.save_views(assignment.server_round, dl.keep_views(views, down.base_round, assignment.server_round,
                                                               down.view))
    return reply


def evaluate_round(packet: wire.Packet, client_id: int, side: ClientSide, store: ClientStore) -> wire.Packet:
    """Handle one evaluation message: the model it carries, evaluated on this client's held-out examples.

    The message carries the adapter as it is (never compressed: evaluation is a measurement, not part of
    a method's traffic) and the base merges the client lacks, which it applies as for training. No fault
    is injected: the faults config is about training. Under a personalized strategy the model is the
    shared part with the client's own ``B`` and head; in the last round (:attr:`wire.Assignment.save_own`)
    the client also saves that model where it keeps its state (:meth:`ClientStore.model_dir`) and says
    where in its reply.
    """
    assignment = wire.decode_assignment(packet, side.trainer.modules())
    assignment = with_own(assignment, store, before=assignment.server_round + 1)
    merges = apply_merges(store, assignment.merges)
    metrics, count = side.trainer.evaluate(client_id, assignment, merges)
    if count < 1:
        raise RuntimeError(f"client {client_id} holds no example to evaluate on; set data.client_test_fraction > 0 "
                           "on every node (the server's and the nodes' data settings must agree)")
    saved = store.model_dir() if assignment.save_own else None
    if saved is not None:  # its own model exists only here: save the very adapter it just scored
        side.trainer.save(saved, assignment.start, assignment.plan.rank, merges)
    return wire.encode_evaluation(metrics, count, saved_to=None if saved is None else str(saved))


def _train_and_encode(assignment: wire.Assignment, client_id: int, side: ClientSide, store: ClientStore,
                      t0: float) -> wire.Packet:
    """Inject the round's faults, train, and encode the reply (keeping the compression residual)."""
    decision = decide(side.faults, side.seed, assignment.server_round, client_id)
    if decision.fail:
        raise InjectedFault(f"injected failure (faults.fail_prob={side.faults.fail_prob:g}, round "
                            f"{assignment.server_round}, client {client_id})")
    if decision.delay_s > 0:
        time.sleep(decision.delay_s)
    merges = apply_merges(store, assignment.merges)
    controlled = ctl.control_of(side.compressor)
    own: AdapterState = {}
    momentum: AdapterState = {}
    if controlled is not None and decision.corrupt is None:  # SCAFCOM: train with the drift correction c - c_k
        own, momentum = ctl.split_client_state(store.residual(assignment.resume_round))
        if controlled.correct_drift:
            if assignment.control is None:
                raise RuntimeError("compression=scafcom on this client, but the server sent no control variate; the "
                                   "node's fedlora settings differ from the server's (compression=...)")
            assignment = dataclasses.replace(assignment, drift=ctl.drift(assignment.control, own))
    trained, loss = side.trainer.train(client_id, assignment, merges)
    plan, start = assignment.plan, assignment.start
    if plan.prune is not None:  # HetLoRA: keep the first slots when training shrank the tail
        rank = self_pruned_rank(plan.rank, plan.prune, start, trained)
        if rank < plan.rank:
            plan, start, trained = (dataclasses.replace(plan, rank=rank), lm.truncate_keys(start, rank),
                                    lm.truncate_keys(trained, rank))
    if plan.personal:  # kept before the reply goes: a resumed run's rerun of this round starts from the older ones
        keep_own(store, assignment.resume_round, assignment.server_round, trained)
    sent = wire.uplink_keys(plan, start)
    report = wire.Report(num_examples=side.trainer.num_examples(client_id), train_loss=float(loss),
                         train_seconds=0.0, rank=plan.rank, base_version=len(merges))
    if decision.corrupt is not None or side.compressor is None or assignment.secure_rank:
        state = {k: trained[k] for k in sent}
        if decision.corrupt is not None:
            state = corrupt_state(state, start, decision.corrupt)
        if assignment.secure_rank:
            return wire.encode_secure(secure_vector(state, assignment.secure_rank, assignment), _timed(report, t0),
                                      assignment.secure_weight)
        return wire.encode_update(state, _timed(report, t0))
    comp = side.compressor
    delta = {k: trained[k] - start[k] for k in sent}
    if controlled is not None:
        seed = seeds.compression(side.seed, assignment.server_round, client_id)  # a randomised codec's choices
        return wire.encode_compressed(_controlled_payload(comp, controlled, assignment, store, delta, own, momentum,
                                                          seed), sent, _timed(report, t0))
    continuing = {k for k in sent if lm.continues(plan, k)}
    kept = store.residual(assignment.resume_round) if comp.error_feedback and continuing else None
    if kept is not None and plan.rank < assignment.plan.rank:  # what it dropped of the pruned slots goes with them
        kept = lm.truncate_keys(kept, plan.rank)
    residual = carried_residual(kept, delta, continuing)
    payload, residual = comp.compress(delta, residual, continuing)
    if residual:
        # a factor not sent this round (RoLoRA's frozen one) keeps its residual for its next round
        store.save_residual(assignment.server_round, {**{k: v for k, v in (kept or {}).items() if k not in delta},
                                                      **residual})
    return wire.encode_compressed(payload, sent, _timed(report, t0))


def _controlled_payload(comp: Compressor, settings: ctl.ControlSettings, assignment: wire.Assignment,
                        store: ClientStore, delta: Mapping[str, Tensor], own: AdapterState,
                        momentum: AdapterState, seed: int) -> Payload:
    """SCAFCOM's message (:mod:`fedlora.core.control`): ``C(v_k - c_k)``; ``c_k`` and ``v_k`` move and are kept
    (on disk in a deployment) before the reply goes, by exactly what the server will decode."""
    message = ctl.client_message(delta, assignment.drift or {}, own, momentum, settings)
    payload, _ = comp.compress(message.target, None, seed=seed)
    own = ctl.advance_own(own, comp.decode(payload), settings)
    store.save_residual(assignment.server_round, ctl.join_client_state(own, {**momentum, **message.momentum}))
    return payload


def self_pruned_rank(rank: int, prune: RankPruning, start: Mapping[str, Tensor], trained: Mapping[str, Tensor]) -> int:
    """HetLoRA's local decision: the smaller rank (:func:`~fedlora.core.lora_math.pruned_rank`) when the
    tail slots beyond it hold less of ``B A`` after training than at the start (the rank regulariser made
    them shrink), else ``rank``. A tail that was zero at the start (``B = 0``) cannot have shrunk."""
    keep = lm.pruned_rank(rank, prune.gamma, prune.min_rank)
    if keep >= rank:
        return rank
    with torch.no_grad():
        before = float(lm.tail_norm(lm.split_state(start)[0], keep))
        after = float(lm.tail_norm(lm.split_state(trained)[0], keep))
    return keep if after < before else rank


def secure_vector(state: Mapping[str, Tensor], rank: int, assignment: wire.Assignment | None = None) -> Tensor:
    """A secure round's vector (:func:`fedlora.core.secure.embed` at ``rank``).

    The server cannot check a masked update, so the client does what it can: a non-finite update
    is refused here (the client then drops out of the round) instead of poisoning the sum. Under
    client-level DP (``assignment.clip_reference``) the vector is the client's change from the
    global adapter in the strategy's space, zero-padded to ``rank`` and clipped to ``assignment.clip``
    (:func:`fedlora.core.privacy.clip_update`): what the server would have clipped had it seen it.
    """
    bad = sorted(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
    if bad:
        raise RuntimeError(f"the update has non-finite values in {bad[:3]}; under secure aggregation the server "
                           "cannot reject it, so this client drops out of the round")
    plan = secure.layout({k: tuple(v.shape) for k, v in state.items()}, rank)
    if assignment is None or assignment.clip_reference is None:
        return secure.embed(state, plan)
    reference = assignment.clip_reference
    if sorted(reference) != sorted(state) or not assignment.clip > 0:
        raise RuntimeError(f"client-level DP: the server's reference holds {sorted(reference)[:3]} with clip "
                           f"{assignment.clip} for an update of {sorted(state)[:3]}; the node's fedlora differs from "
                           "the server's")
    # both zero-padded to the layout by embed (float64); the change then clipped as the server would clip it
    change = secure.embed(state, plan) - secure.embed(reference, plan)
    clipped, _ = privacy.clip_update({"change": change}, assignment.clip)
    return clipped["change"]


def carried_residual(kept: Mapping[str, Tensor] | None, delta: Mapping[str, Tensor],
                     continuing: Collection[str]) -> AdapterState | None:
    """The residual to add to this round's ``delta``: ``kept``'s for every continuing tensor, zeros for one
    it has none of (sent for the first time: RoLoRA trains ``A`` first in its second round); ``None``
    when nothing is kept."""
    if kept is None:
        return None
    return {k: kept[k] if k in kept else torch.zeros_like(delta[k]) for k in continuing}


def _timed(report: wire.Report, t0: float) -> wire.Report:
    return wire.Report(report.num_examples, report.train_loss, time.perf_counter() - t0, report.rank,
                       report.base_version)
