"""The wire codec: what travels between the server and a client, in both directions.

This is the only code that knows which tensors travel and which plan flags say so:

* **down** (:func:`encode_assignment` / :func:`decode_assignment`): the client's plan flags, the
  tensors of its start adapter that it cannot rebuild itself (:func:`downlink_keys`: none of the
  LoRA factors of a fresh adapter, no ``A`` when ``send_lora_a`` is off), as they are or, with a
  downlink compressor, as the compressed difference from the copy the client holds
  (:mod:`fedlora.federation.downlink`), and the base merges it has not applied yet. Both ends build
  the start adapter with :func:`fedlora.core.lora_math.plan_start`, so they hold it bit for bit;
* **up** (:func:`encode_update`, :func:`encode_compressed` / :func:`decode_reply`): the trained
  tensors of :func:`uplink_keys` (no frozen factor, no ``A`` when ``send_lora_a`` is off), plain or as the round's
  update encoded by the run's compressor, and the client's :class:`Report`;
* **hello**: the run's label names down, the client's id, rank and example count up.

A :class:`Packet` is framework-neutral (named numpy arrays, one config record, one metrics record);
:mod:`fedlora.flower.records` maps it one to one onto a Flower ``RecordDict``, and in-process
transports pass it as it is. Nothing here imports Flower.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from fedlora.core import control as ctl
from fedlora.core import lora_math as lm
from fedlora.core import varint
from fedlora.core.types import (
    PERSONAL_KEPT,
    AdapterState,
    BaseMerge,
    ClientPlan,
    Compressor,
    Payload,
    RankPruning,
    Tensor,
)
from fedlora.federation import downlink as dl
from fedlora.federation import keys

ConfigValue = int | float | bool | str | list[str]
# in the error of a client whose plan says it keeps its own B and head (ClientPlan.personal) and holds none
PERSONAL_LOST = "personal state lost"
_FIELD_SEP = "|"  # payload array names: "<tensor key>|<field>"


class WireError(ValueError):
    """A packet cannot be decoded; the message is the reason written into ``metrics.jsonl``."""


@dataclass
class Packet:
    """One message's content: named array records, one config record, one metrics record."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    config: dict[str, ConfigValue] = field(default_factory=dict)
    metrics: dict[str, int | float] = field(default_factory=dict)

    def nbytes(self) -> int:
        """The bytes of the arrays alone (a size for transports without a serialisation of their own)."""
        return sum(int(a.nbytes) for arrays in self.arrays.values() for a in arrays.values())

    def record_names(self) -> list[str]:
        """The names of the records this packet holds (for error messages)."""
        names = list(self.arrays)
        names += [keys.CONFIG] if self.config else []
        names += [keys.METRICS] if self.metrics else []
        return sorted(names)


@dataclass(frozen=True)
class Assignment:
    """One client's part of one round, as both ends hold it.

    Attributes
    ----------
    server_round:
        The round.
    plan:
        The strategy's plan for this client (on the client: rebuilt from the packet, holding only
        what travelled).
    start:
        The adapter the client starts from (:func:`fedlora.core.lora_math.plan_start`).
    merges:
        ``(index, merge)`` of the base merges the client has not applied yet.
    resume_round:
        The checkpoint round a resumed run continued from (0: a fresh run); a client that lost
        its state reloads what it kept on disk up to that round.
    secure_rank:
        A secure-aggregation round: the rank of the layout the client pads its uplink tensors to
        (:mod:`fedlora.core.secure`); 0 for a round whose reply carries the tensors themselves.
    secure_seed:
        A secure round: the seed of the client's stochastic quantization (Flower's mod draws it
        from NumPy's global generator), so that a rerun or resume sums the same.
    secure_weight:
        A secure round: the weight the client's vector enters the sum with; 0: its example count.
    clip_reference:
        Client-level DP under secure aggregation (:mod:`fedlora.core.privacy`): the global adapter's
        uplink tensors at the layout rank; the client masks ``clip(padded update - reference)`` instead
        of its update (the server cannot clip a masked vector). ``None`` otherwise.
    clip:
        With ``clip_reference``: the L2 norm ``C`` the client clips its change to.
    downlink:
        With a downlink compressor: the message that carries the start (``plan.adapter`` is then the
        copy it leaves the client with, ``downlink.view``); ``None``: the start travels as it is.
    control:
        Controlled averaging (``compression=scafcom``, :mod:`fedlora.core.control`): the server's control
        variate ``c`` of every tensor the client sends, at its rank (the server decodes the reply with it);
        ``None`` otherwise.
    send_control:
        Whether ``control`` travels to the client (it does when the client corrects its drift with it).
    drift:
        On the client only (never encoded): the drift correction ``c - c_k`` its local steps add, spread
        evenly over them (:func:`fedlora.core.control.drift`); ``None``: no correction.
    planned:
        On the server only (never encoded), with a compressed downlink: the start the strategy planned,
        which the server adds the client's update to (:func:`base`), while the client trains from its
        copy ``start``; ``None``: ``start`` itself.
    save_own:
        An evaluation message of a personalized strategy's last round: the client also saves the model it
        evaluates (its own ``B`` and head with the shared part) in peft's format where it keeps its state,
        since no one else holds it (:func:`fedlora.federation.client.evaluate_round`).
    """

    server_round: int
    plan: ClientPlan
    start: AdapterState
    merges: tuple[tuple[int, BaseMerge], ...] = ()
    resume_round: int = 0
    secure_rank: int = 0
    secure_seed: int = 0
    downlink: dl.Downlink | None = None
    control: AdapterState | None = None
    drift: AdapterState | None = None
    send_control: bool = False
    planned: AdapterState | None = None
    secure_weight: int = 0
    clip_reference: AdapterState | None = None
    clip: float = 0.0
    save_own: bool = False


def base(assignment: Assignment) -> AdapterState:
    """What the server adds a client's update to: the planned start (:attr:`Assignment.planned`) when the
    client trained from a compressed copy of it, so that the server's model moves by the clients' updates
    exactly and what compression dropped stays in the next message (EF21-P,
    :mod:`fedlora.federation.downlink`); else the start itself."""
    return assignment.planned if assignment.planned is not None else assignment.start


@dataclass(frozen=True)
class Report:
    """What a client says about its round besides its tensors."""

    num_examples: int
    train_loss: float
    train_seconds: float
    rank: int | None = None  # the rank it trained (checked against the assigned one)
    base_version: int | None = None  # how many base merges it trained on


# -- which tensors travel -------------------------------------------------------------------------
def downlink_keys(plan: ClientPlan, start: Mapping[str, Tensor]) -> list[str]:
    """The tensors of ``start`` the server sends: what the client cannot rebuild from the plan (nor holds:
    its own ``B`` and head under a personal plan, :data:`~fedlora.core.types.PERSONAL_KEPT`)."""
    if plan.adapter is None:  # fresh factors: drawn on the client from init_seed
        return [k for k in start if not lm.is_lora_key(k)]
    kept = plan.personal == PERSONAL_KEPT
    return [k for k in start if (plan.send_lora_a or not lm.is_lora_a_key(k)) and not (kept and lm.is_personal_key(k))]


def uplink_keys(plan: ClientPlan, start: Mapping[str, Tensor]) -> list[str]:
    """The tensors a client sends back, sorted: those it trained (a frozen factor stays: the server has
    it), never ``A`` when it stays off the wire, and never its own ``B`` and head under a personal plan."""
    def trained(key: str) -> bool:
        if lm.is_lora_a_key(key):
            return plan.train_lora_a and plan.send_lora_a
        if plan.personal:
            return False
        return plan.train_lora_b or not lm.is_lora_b_key(key)

    return sorted(k for k in start if trained(k))


def uplink_shapes(assignment: Assignment) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor the client must send back (at its assigned rank)."""
    return {k: tuple(assignment.start[k].shape) for k in uplink_keys(assignment.plan, assignment.start)}


def held_control(copied: Mapping[str, Tensor], plan: ClientPlan, start: Mapping[str, Tensor]) -> AdapterState:
    """The control variate a client corrects its drift with (and the server decodes its reply with) when ``c``
    travels in its compressed copy (:mod:`fedlora.federation.downlink`): the copy's ``c`` of every tensor it
    sends back. The copy holds ``c`` of every tensor of the start that travels, so that its layout stays one
    from round to round (RoLoRA alternates the factor it trains)."""
    return {k: copied[k] for k in uplink_keys(plan, start)}


def complete(received: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> AdapterState:
    """The client's whole trained adapter: what it sent, and from ``start`` what stayed (its frozen ``A``).

    Call it only on a checked reply (every key of :func:`uplink_keys` present, nothing else).
    """
    state = dict(received)
    for key, value in start.items():
        state.setdefault(key, value.clone())
    return state


# -- arrays -------------------------------------------------------------------------------------
def to_arrays(tensors: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """Tensors as numpy arrays (CPU, contiguous, same dtype)."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}


def to_tensors(arrays: Mapping[str, np.ndarray]) -> AdapterState:
    """Numpy arrays as tensors that own their memory."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


# -- down -----------------------------------------------------------------------------------------
def encode_assignment(assignment: Assignment) -> Packet:
    """The message that gives a client its round."""
    plan, start, down = assignment.plan, assignment.start, assignment.downlink
    sent = {} if down is not None else {k: start[k] for k in downlink_keys(plan, start)}
    packet = Packet(
        arrays={keys.ADAPTER: to_arrays(sent)} if down is None or down.dense else {},
        config={keys.SERVER_ROUND: assignment.server_round, keys.RANK: plan.rank, keys.INIT_SEED: plan.init_seed,
                keys.FRESH: plan.adapter is None, keys.TRAIN_LORA_A: plan.train_lora_a,
                keys.SEND_LORA_A: plan.send_lora_a, keys.RESUME_ROUND: assignment.resume_round})
    if not plan.train_lora_b:  # only when set: every other plan's message stays as it was, byte for byte
        packet.config[keys.TRAIN_LORA_B] = False
    if plan.personal:
        packet.config[keys.PERSONAL] = plan.personal
    if plan.prune is not None:
        packet.config[keys.PRUNE_GAMMA] = float(plan.prune.gamma)
        packet.config[keys.PRUNE_WEIGHT] = float(plan.prune.weight)
        packet.config[keys.PRUNE_MIN_RANK] = int(plan.prune.min_rank)
    if down is not None:
        if down.dense:
            packet.arrays[keys.ADAPTER] = to_arrays(down.dense)
        packet.arrays[keys.DOWNLINK] = pack_payload(down.payload, sorted(down.view))
        packet.config[keys.DOWNLINK_BASE] = down.base_round
        packet.config[keys.DOWNLINK_CRC] = down.base_crc
        if any(k.startswith(dl.CONTROL) for k in down.view):
            packet.config[keys.DOWNLINK_CONTROL] = True
    if assignment.merges:
        packet.arrays[keys.BASE] = to_arrays(lm.merges_to_tensors(assignment.merges))
    if assignment.control is not None and assignment.send_control:
        packet.arrays[keys.CONTROL] = to_arrays(assignment.control)
    if assignment.secure_rank:
        packet.config[keys.SECURE_RANK] = assignment.secure_rank
        packet.config[keys.SECURE_SEED] = assignment.secure_seed
        if assignment.secure_weight:
            packet.config[keys.SECURE_WEIGHT] = assignment.secure_weight
    if assignment.clip_reference is not None:
        packet.arrays[keys.CLIP_REFERENCE] = to_arrays(assignment.clip_reference)
        packet.config[keys.DP_CLIP] = float(assignment.clip)
    if assignment.save_own:
        packet.config[keys.SAVE_OWN] = True
    return packet


def _int(value: ConfigValue | int | float) -> int:
    if isinstance(value, list):
        raise ValueError(f"expected a number, got the list {value!r}")
    return int(value)


def decode_assignment(packet: Packet, modules: Mapping[str, tuple[int, int]], *,
                      downlink: Compressor | None = None,
                      views: Callable[[int], Mapping[int, AdapterState]] | None = None) -> Assignment:
    """The client's view of its round; ``modules`` (name -> ``(m, n)``) rebuilds what did not travel.

    A compressed start (:mod:`fedlora.federation.downlink`) needs the run's ``downlink`` compressor and
    ``views``: resume round -> the copies the client holds, by round.

    Raises
    ------
    ValueError
        For a compressed start the client cannot decode (no compressor, or the copy it names lost).
    """
    conf = packet.config
    received = to_tensors(packet.arrays.get(keys.ADAPTER, {}))
    rank, seed = _int(conf[keys.RANK]), _int(conf[keys.INIT_SEED])
    train_a, send_a = bool(conf[keys.TRAIN_LORA_A]), bool(conf[keys.SEND_LORA_A])
    train_b = bool(conf.get(keys.TRAIN_LORA_B, True))
    personal = str(conf.get(keys.PERSONAL, ""))
    prune = (RankPruning(gamma=float(cast(float, conf[keys.PRUNE_GAMMA])),
                         weight=float(cast(float, conf[keys.PRUNE_WEIGHT])), min_rank=_int(conf[keys.PRUNE_MIN_RANK]))
             if keys.PRUNE_GAMMA in conf else None)
    down: dl.Downlink | None = None
    control = to_tensors(packet.arrays[keys.CONTROL]) if keys.CONTROL in packet.arrays else None
    if keys.DOWNLINK in packet.arrays:
        down = _decode_downlink(packet, modules, received, downlink, views)
        view, copied = dl.split_view(down.view)
        plan = ClientPlan(rank=rank, adapter=view, init_seed=seed, train_lora_a=train_a, send_lora_a=send_a,
                          train_lora_b=train_b, prune=prune)
        if copied:  # SCAFCOM's c travels in the copy
            control = held_control(copied, plan, lm.plan_start(plan, modules))
    elif bool(conf[keys.FRESH]):
        head = {k: v for k, v in received.items() if not lm.is_lora_key(k)}
        plan = ClientPlan(rank=rank, adapter=None, init_seed=seed, train_lora_a=train_a, send_lora_a=send_a,
                          head=head, train_lora_b=train_b, prune=prune)
    else:
        plan = ClientPlan(rank=rank, adapter=received, init_seed=seed, train_lora_a=train_a, send_lora_a=send_a,
                          train_lora_b=train_b, personal=personal, prune=prune)
    merges = lm.tensors_to_merges(to_tensors(packet.arrays[keys.BASE])) if keys.BASE in packet.arrays else []
    return Assignment(_int(conf[keys.SERVER_ROUND]), plan, lm.plan_start(plan, modules), tuple(merges),
                      _int(conf.get(keys.RESUME_ROUND, 0)), _int(conf.get(keys.SECURE_RANK, 0)),
                      _int(conf.get(keys.SECURE_SEED, 0)), down, control, send_control=control is not None,
                      secure_weight=_int(conf.get(keys.SECURE_WEIGHT, 0)),
                      clip_reference=(to_tensors(packet.arrays[keys.CLIP_REFERENCE])
                                      if keys.CLIP_REFERENCE in packet.arrays else None),
                      clip=float(cast(float, conf.get(keys.DP_CLIP, 0.0))),
                      save_own=bool(conf.get(keys.SAVE_OWN, False)))


def _decode_downlink(packet: Packet, modules: Mapping[str, tuple[int, int]], dense: AdapterState,
                     compressor: Compressor | None,
                     views: Callable[[int], Mapping[int, AdapterState]] | None) -> dl.Downlink:
    """The copy a compressed start leaves the client with (:func:`fedlora.federation.downlink.decode`)."""
    conf = packet.config
    if compressor is None or views is None:
        raise ValueError("a compressed start adapter, but this client has no downlink compressor; the node's "
                         "fedlora settings differ from the server's (downlink=...)")
    base_round, base_crc = _int(conf[keys.DOWNLINK_BASE]), _int(conf[keys.DOWNLINK_CRC])
    rank, seed = _int(conf[keys.RANK]), _int(conf[keys.INIT_SEED])
    held = views(_int(conf.get(keys.RESUME_ROUND, 0)))
    reference = ClientPlan(rank=rank, adapter=None, init_seed=seed)
    if base_round == 0:  # the reference's tensors that travel, by the one rule (downlink_keys of a continuing plan)
        continuing = ClientPlan(rank=rank, adapter={}, init_seed=seed, send_lora_a=bool(conf[keys.SEND_LORA_A]))
        names = downlink_keys(continuing, lm.fresh_state(modules, rank, seed, dense))
        names += [dl.CONTROL + k for k in names] if conf.get(keys.DOWNLINK_CONTROL) else []  # and c of each
        names = sorted(names)
    else:
        names = sorted(held.get(base_round, {}))
    payload = unpack_payload(packet.arrays[keys.DOWNLINK], names) if names else {}
    view = dl.decode(compressor, payload, base_round=base_round, base_crc=base_crc, dense=dense, plan=reference,
                     modules=modules, names=names, views=held)
    return dl.Downlink(base_round, base_crc, payload, dense, view)


# -- up -------------------------------------------------------------------------------------------
def _report_metrics(report: Report) -> dict[str, int | float]:
    metrics: dict[str, int | float] = {keys.TRAIN_LOSS: float(report.train_loss),
                                       keys.NUM_EXAMPLES: int(report.num_examples)}
    if report.rank is not None:
        metrics[keys.RANK] = int(report.rank)
    if report.base_version is not None:
        metrics[keys.BASE_VERSION] = int(report.base_version)
    metrics[keys.TRAIN_SECONDS] = float(report.train_seconds)
    return metrics


def encode_update(sent: Mapping[str, Tensor], report: Report) -> Packet:
    """A reply carrying the trained tensors as they are."""
    return Packet(arrays={keys.ADAPTER: to_arrays(sent)}, metrics=_report_metrics(report))


def encode_secure(vector: Tensor, report: Report, weight: int = 0) -> Packet:
    """A secure round's reply: the flat vector secure aggregation masks (it never reaches the server as
    such) and the report, which travels in the clear; ``weight``: what the vector is weighted by in the
    sum (0: the report's example count)."""
    metrics = _report_metrics(report)
    if weight:
        metrics[keys.SECURE_WEIGHT] = int(weight)
    return Packet(arrays={keys.SECURE: {"vector": vector.detach().to(torch.float64).numpy()}}, metrics=metrics)


def decode_report(metrics: Mapping[str, ConfigValue | int | float]) -> Report:
    """A reply's report from its metrics (raises ``KeyError``/``ValueError`` on a malformed one)."""
    return Report(num_examples=_int(metrics[keys.NUM_EXAMPLES]),
                  train_loss=float(cast(float, metrics[keys.TRAIN_LOSS])),
                  train_seconds=float(cast(float, metrics[keys.TRAIN_SECONDS])),
                  rank=_int(metrics[keys.RANK]) if keys.RANK in metrics else None,
                  base_version=_int(metrics[keys.BASE_VERSION]) if keys.BASE_VERSION in metrics else None)


def encode_compressed(payload: Payload, sent_keys: Sequence[str], report: Report) -> Packet:
    """A reply carrying a compressor's payload of the update of ``sent_keys`` (:func:`uplink_keys`)."""
    return Packet(arrays={keys.COMPRESSED: pack_payload(payload, sorted(sent_keys))}, metrics=_report_metrics(report))


def as_trained(assignment: Assignment, report: Report) -> Assignment:
    """``assignment`` as the client replied to it: at the smaller rank it reports when its plan let it prune
    (:class:`~fedlora.core.types.RankPruning`: exactly HetLoRA's next rank, the first slots of its start);
    unchanged otherwise (a rank it was not allowed then fails the server's checks)."""
    plan = assignment.plan
    if plan.prune is None or report.rank is None or report.rank >= plan.rank:
        return assignment
    if report.rank != lm.pruned_rank(plan.rank, plan.prune.gamma, plan.prune.min_rank):
        return assignment
    return at_rank(assignment, report.rank)


def at_rank(assignment: Assignment, rank: int) -> Assignment:
    """``assignment`` cut to its first ``rank`` slots (the plan's rank and the start's factors); itself when
    ``rank`` is not smaller than the plan's."""
    if rank >= assignment.plan.rank:
        return assignment
    planned = lm.truncate_keys(assignment.planned, rank) if assignment.planned is not None else None
    return dataclasses.replace(assignment, plan=dataclasses.replace(assignment.plan, rank=rank),
                               start=lm.truncate_keys(assignment.start, rank), planned=planned)


def decode_reply(packet: Packet, assignment: Assignment, compressor: Compressor | None,
                 ) -> tuple[AdapterState, Report]:
    """The tensors a client sent (decompressed: start plus update, at the rank it replied at:
    :func:`as_trained`) and its report.

    Raises
    ------
    WireError
        With the reason, when the packet is not a reply or cannot be decoded.
    """
    arrays = packet.arrays
    if not packet.metrics or (keys.COMPRESSED not in arrays and keys.ADAPTER not in arrays):
        raise WireError(f"malformed reply: records {packet.record_names()}; expected an adapter and metrics")
    m = packet.metrics
    try:
        if keys.COMPRESSED in arrays and compressor is None:
            raise ValueError("a compressed update, but this run has no compression")
        if keys.COMPRESSED not in arrays and ctl.control_of(compressor) is not None:
            raise ValueError("an uncompressed update in a run with control variates (compression=scafcom or ef21): "
                             "the server cannot tell what it would add to c")
        report = decode_report(m)
        assignment = as_trained(assignment, report)
        start = base(assignment)
        if compressor is not None and keys.COMPRESSED in arrays:
            delta = compressed_message(packet, assignment, compressor)
            settings = ctl.control_of(compressor)
            if settings is not None:  # SCAFCOM: the reply stands for start + eta_g (c + d_k)
                if assignment.control is None:
                    raise ValueError("a controlled reply to a message that carried no control variate")
                received = ctl.effective_update(start, assignment.control, delta, settings)
            else:
                received = {k: start[k] + delta[k].reshape(start[k].shape) for k in delta}
        else:
            received = to_tensors(arrays[keys.ADAPTER])
            if assignment.planned is not None:  # trained from its copy: the same update, on the planned start
                received = {k: start[k] + (v.reshape(start[k].shape) - assignment.start[k]) if k in start else v
                            for k, v in received.items()}
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise WireError(f"cannot decode the update: {type(exc).__name__}: {str(exc)[:200]}") from exc
    return received, report


def compressed_message(packet: Packet, assignment: Assignment, compressor: Compressor) -> AdapterState:
    """What a compressed reply's payload decodes to (the update, or SCAFCOM's ``d_k``), per tensor sent, at the
    rank the client replied at (:func:`as_trained` of ``assignment`` must already have been applied)."""
    sent = uplink_keys(assignment.plan, assignment.start)
    return compressor.decode(unpack_payload(packet.arrays[keys.COMPRESSED], sent))


# -- evaluation -----------------------------------------------------------------------------------
def encode_evaluation(metrics: Mapping[str, float], num_examples: int, saved_to: str | None = None) -> Packet:
    """A client's answer to an evaluation message: the task's metrics on its held-out examples, how many, and
    where it saved the model it evaluated when asked to (:attr:`Assignment.save_own`)."""
    values: dict[str, int | float] = {keys.EVAL_PREFIX + k: float(v) for k, v in metrics.items()}
    values[keys.NUM_EXAMPLES] = int(num_examples)
    return Packet(metrics=values, config={keys.SAVED_TO: saved_to} if saved_to is not None else {})


def saved_to(packet: Packet) -> str | None:
    """Where an evaluation reply says its client saved the model it evaluated (``None``: it saved none)."""
    value = packet.config.get(keys.SAVED_TO)
    return None if value is None else str(value)


def decode_evaluation(packet: Packet) -> tuple[dict[str, float], int]:
    """The metrics and example count of an evaluation reply.

    Raises
    ------
    WireError
        When the packet is not an evaluation reply (no metrics, or no example count).
    """
    m = packet.metrics
    try:
        count = _int(m[keys.NUM_EXAMPLES])
        metrics = {k[len(keys.EVAL_PREFIX):]: float(cast(float, v)) for k, v in m.items()
                   if k.startswith(keys.EVAL_PREFIX)}
    except (KeyError, ValueError, TypeError) as exc:
        raise WireError(f"malformed evaluation reply: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not metrics:
        raise WireError(f"malformed evaluation reply: records {packet.record_names()}, no eval/ metrics")
    return metrics, count


# -- hello ----------------------------------------------------------------------------------------
def encode_hello(label_names: Sequence[str]) -> Packet:
    """The server's hello: the run's class names, in its numbering (a node with its own file needs them)."""
    return Packet(config={keys.ACTION: keys.HELLO, keys.LABEL_NAMES: list(label_names)})


def decode_hello(packet: Packet) -> tuple[str, ...] | None:
    """The label names a hello carries (``None``: none)."""
    names = packet.config.get(keys.LABEL_NAMES)
    return None if names is None else tuple(str(n) for n in names)  # type: ignore[union-attr]


def encode_hello_reply(client_id: int, rank: int, num_examples: int) -> Packet:
    """A client's answer to the hello: who it is."""
    return Packet(metrics={keys.PARTITION_ID: client_id, keys.RANK: rank, keys.NUM_EXAMPLES: num_examples})


def decode_hello_reply(packet: Packet) -> tuple[int, int, int]:
    """``(client id, rank, number of training examples)`` of a hello reply."""
    m = packet.metrics
    return _int(m[keys.PARTITION_ID]), _int(m[keys.RANK]), _int(m[keys.NUM_EXAMPLES])


# -- compressed payload framing ---------------------------------------------------------------------
_PACK_VERSION = 1
_PACKED = "packed"  # the one array a packed payload travels as


def _keys_fingerprint(names: Sequence[str]) -> int:
    return zlib.crc32("\n".join(names).encode())


def pack_payload(payload: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Pack a per-tensor payload ``{"<key>|<field>": array}`` into one byte array.

    Flower frames every array with its name, dtype and shape (about 100 bytes, more with a long
    tensor name), which for a small compressed adapter costs more than the data. Both sides know
    ``names`` (the sorted names of the tensors sent), so one array travels: varints (the format,
    the number of names, a CRC-32 fingerprint of them, the fields, each ``field:dtype``, then the
    element count of every field of every tensor), followed by the fields' data, field by field,
    tensor by tensor, little-endian. Headers cost what they carry (:mod:`fedlora.core.varint`).

    Raises
    ------
    ValueError
        When one field has arrays of two dtypes, or a payload name is not one of ``names``.
    """
    fields = sorted({name.rpartition(_FIELD_SEP)[2] for name in payload})
    unknown = sorted({name.rpartition(_FIELD_SEP)[0] for name in payload} - set(names))
    if unknown:
        raise ValueError(f"payload tensors {unknown[:3]} are not among the {len(names)} tensors sent")
    dtypes: list[np.dtype] = []
    for part in fields:
        kinds = {np.asarray(arr).dtype.newbyteorder("<") for name, arr in payload.items()
                 if name.rpartition(_FIELD_SEP)[2] == part}
        if len(kinds) != 1:
            raise ValueError(f"payload field {part!r} has arrays of dtypes {sorted(map(str, kinds))}; pack one")
        dtypes.append(kinds.pop())
    description = ",".join(f"{part}:{dtype.str}" for part, dtype in zip(fields, dtypes, strict=True)).encode()
    counts: list[int] = []
    data: list[bytes] = []
    for part, dtype in zip(fields, dtypes, strict=True):
        for name in names:
            arr = payload.get(f"{name}{_FIELD_SEP}{part}")
            counts.append(0 if arr is None else int(np.asarray(arr).size))
            if arr is not None:
                data.append(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    head = varint.encode([_PACK_VERSION, len(names), _keys_fingerprint(names), len(description)])
    blob = b"".join([head, description, varint.encode(counts), *data])
    return {_PACKED: np.frombuffer(blob, dtype=np.uint8).copy()}


def unpack_payload(packed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_payload` given the same ``names`` (every field of every tensor, empty
    where it had none).

    Raises
    ------
    ValueError
        When the payload is for other tensors, of another format, or cut short.
    """
    if set(packed) != {_PACKED}:
        raise ValueError(f"a packed payload is one array {_PACKED!r}, not {sorted(packed)[:4]}")
    blob = np.ascontiguousarray(packed[_PACKED], dtype=np.uint8).tobytes()
    (version, n, fingerprint, desc_len), pos = varint.decode(blob, 4)
    if version != _PACK_VERSION:
        raise ValueError(f"packed payload format {version}; this decoder reads {_PACK_VERSION}")
    if n != len(names) or fingerprint != _keys_fingerprint(names):
        raise ValueError(f"packed payload is for {n} other tensors than the {len(names)} expected")
    description = blob[pos:pos + desc_len].decode()
    pos += desc_len
    fields = [item.split(":", 1) for item in description.split(",")] if description else []
    counts, pos = varint.decode(blob, n * len(fields), pos)
    out: dict[str, np.ndarray] = {}
    at = 0
    for part, dtype_str in fields:
        dtype = np.dtype(dtype_str)
        for name in names:
            size = counts[at] * dtype.itemsize
            at += 1
            if pos + size > len(blob):
                raise ValueError(f"packed payload ends at byte {len(blob)}, inside {name}{_FIELD_SEP}{part}")
            out[f"{name}{_FIELD_SEP}{part}"] = np.frombuffer(blob, dtype=dtype, count=counts[at - 1],
                                                             offset=pos).astype(dtype.newbyteorder("="))
            pos += size
    if pos != len(blob):
        raise ValueError(f"packed payload has {len(blob) - pos} bytes after its last field")
    return out
