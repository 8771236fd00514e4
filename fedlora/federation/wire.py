"""The wire codec: what travels between the server and a client, in both directions.

This is the only code that knows which tensors travel and which plan flags say so:

* **down** (:func:`encode_assignment` / :func:`decode_assignment`): the client's plan flags, the
  tensors of its start adapter that it cannot rebuild itself (:func:`downlink_keys`: none of the
  LoRA factors of a fresh adapter, no ``A`` when ``send_lora_a`` is off) and the base merges it has
  not applied yet. Both ends build the start adapter with :func:`fedlora.core.lora_math.plan_start`,
  so they hold it bit for bit;
* **up** (:func:`encode_update`, :func:`encode_compressed` / :func:`decode_reply`): the trained
  tensors of :func:`uplink_keys` (no frozen factor, no ``A`` when ``send_lora_a`` is off), plain or as the round's
  update encoded by the run's compressor, and the client's :class:`Report`;
* **hello**: the run's label names down, the client's id, rank and example count up.

A :class:`Packet` is framework-neutral (named numpy arrays, one config record, one metrics record);
:mod:`fedlora.flower.records` maps it one to one onto a Flower ``RecordDict``, and in-process
transports pass it as it is. Nothing here imports Flower.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, BaseMerge, ClientPlan, Compressor, Payload, Tensor
from fedlora.federation import keys

ConfigValue = int | float | bool | str | list[str]
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
    """

    server_round: int
    plan: ClientPlan
    start: AdapterState
    merges: tuple[tuple[int, BaseMerge], ...] = ()
    resume_round: int = 0
    secure_rank: int = 0
    secure_seed: int = 0


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
    """The tensors of ``start`` the server sends: what the client cannot rebuild from the plan."""
    if plan.adapter is None:  # fresh factors: drawn on the client from init_seed
        return [k for k in start if not lm.is_lora_key(k)]
    return [k for k in start if plan.send_lora_a or not lm.is_lora_a_key(k)]


def uplink_keys(plan: ClientPlan, start: Mapping[str, Tensor]) -> list[str]:
    """The tensors a client sends back, sorted: those it trained (a frozen factor stays: the server has
    it), and never ``A`` when it stays off the wire."""
    def trained(key: str) -> bool:
        if lm.is_lora_a_key(key):
            return plan.train_lora_a and plan.send_lora_a
        return plan.train_lora_b or not lm.is_lora_b_key(key)

    return sorted(k for k in start if trained(k))


def uplink_shapes(assignment: Assignment) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor the client must send back (at its assigned rank)."""
    return {k: tuple(assignment.start[k].shape) for k in uplink_keys(assignment.plan, assignment.start)}


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
    plan, start = assignment.plan, assignment.start
    packet = Packet(
        arrays={keys.ADAPTER: to_arrays({k: start[k] for k in downlink_keys(plan, start)})},
        config={keys.SERVER_ROUND: assignment.server_round, keys.RANK: plan.rank, keys.INIT_SEED: plan.init_seed,
                keys.FRESH: plan.adapter is None, keys.TRAIN_LORA_A: plan.train_lora_a,
                keys.SEND_LORA_A: plan.send_lora_a, keys.RESUME_ROUND: assignment.resume_round})
    if not plan.train_lora_b:  # only when set: every other plan's message stays as it was, byte for byte
        packet.config[keys.TRAIN_LORA_B] = False
    if assignment.merges:
        packet.arrays[keys.BASE] = to_arrays(lm.merges_to_tensors(assignment.merges))
    if assignment.secure_rank:
        packet.config[keys.SECURE_RANK] = assignment.secure_rank
        packet.config[keys.SECURE_SEED] = assignment.secure_seed
    return packet


def _int(value: ConfigValue | int | float) -> int:
    if isinstance(value, list):
        raise ValueError(f"expected a number, got the list {value!r}")
    return int(value)


def decode_assignment(packet: Packet, modules: Mapping[str, tuple[int, int]]) -> Assignment:
    """The client's view of its round; ``modules`` (name -> ``(m, n)``) rebuilds what did not travel."""
    conf = packet.config
    received = to_tensors(packet.arrays.get(keys.ADAPTER, {}))
    rank, seed = _int(conf[keys.RANK]), _int(conf[keys.INIT_SEED])
    train_a, send_a = bool(conf[keys.TRAIN_LORA_A]), bool(conf[keys.SEND_LORA_A])
    train_b = bool(conf.get(keys.TRAIN_LORA_B, True))
    if bool(conf[keys.FRESH]):
        head = {k: v for k, v in received.items() if not lm.is_lora_key(k)}
        plan = ClientPlan(rank=rank, adapter=None, init_seed=seed, train_lora_a=train_a, send_lora_a=send_a,
                          head=head, train_lora_b=train_b)
    else:
        plan = ClientPlan(rank=rank, adapter=received, init_seed=seed, train_lora_a=train_a, send_lora_a=send_a,
                          train_lora_b=train_b)
    merges = lm.tensors_to_merges(to_tensors(packet.arrays[keys.BASE])) if keys.BASE in packet.arrays else []
    return Assignment(_int(conf[keys.SERVER_ROUND]), plan, lm.plan_start(plan, modules), tuple(merges),
                      _int(conf.get(keys.RESUME_ROUND, 0)), _int(conf.get(keys.SECURE_RANK, 0)),
                      _int(conf.get(keys.SECURE_SEED, 0)))


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


def encode_secure(vector: Tensor, report: Report) -> Packet:
    """A secure round's reply: the flat vector secure aggregation masks (it never reaches the server as
    such) and the report, which travels in the clear."""
    return Packet(arrays={keys.SECURE: {"vector": vector.detach().to(torch.float64).numpy()}},
                  metrics=_report_metrics(report))


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


def decode_reply(packet: Packet, assignment: Assignment, compressor: Compressor | None,
                 ) -> tuple[AdapterState, Report]:
    """The tensors a client sent (decompressed: start plus update) and its report.

    Raises
    ------
    WireError
        With the reason, when the packet is not a reply or cannot be decoded.
    """
    arrays = packet.arrays
    if not packet.metrics or (keys.COMPRESSED not in arrays and keys.ADAPTER not in arrays):
        raise WireError(f"malformed reply: records {packet.record_names()}; expected an adapter and metrics")
    start, m = assignment.start, packet.metrics
    try:
        if keys.COMPRESSED in arrays:
            if compressor is None:
                raise ValueError("a compressed update, but this run has no compression")
            sent = uplink_keys(assignment.plan, start)
            delta = compressor.decode(unpack_payload(arrays[keys.COMPRESSED], sent))
            received = {k: start[k] + delta[k].reshape(start[k].shape) for k in delta}
        else:
            received = to_tensors(arrays[keys.ADAPTER])
        report = decode_report(m)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise WireError(f"cannot decode the update: {type(exc).__name__}: {str(exc)[:200]}") from exc
    return received, report


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
def _keys_fingerprint(names: Sequence[str]) -> int:
    return zlib.crc32("\n".join(names).encode())


def pack_payload(payload: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Pack a per-tensor payload ``{"<key>|<field>": array}`` into one array per field.

    Long tensor names would otherwise travel once per array (Flower's envelope per array is ~100
    bytes plus the name), which for a small compressed adapter costs more than the data. Both sides
    know ``names`` (the sorted names of the tensors sent), so only the per-field lengths and a
    fingerprint of the name list travel.
    """
    fields = sorted({name.rpartition(_FIELD_SEP)[2] for name in payload})
    packed: dict[str, np.ndarray] = {}
    lengths = np.zeros((len(names), len(fields)), dtype=np.int64)
    for j, part in enumerate(fields):
        parts = []
        for i, name in enumerate(names):
            arr = payload.get(f"{name}{_FIELD_SEP}{part}")
            if arr is not None:
                lengths[i, j] = arr.size
                parts.append(np.ravel(arr))
        packed[part] = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)
    packed["_lengths"] = lengths
    packed["_meta"] = np.array([len(names), _keys_fingerprint(names)], dtype=np.int64)
    packed["_fields"] = np.frombuffer(",".join(fields).encode(), dtype=np.uint8).copy()
    return packed


def unpack_payload(packed: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_payload` given the same ``names``."""
    n, fingerprint = (int(x) for x in packed["_meta"])
    if n != len(names) or fingerprint != _keys_fingerprint(names):
        raise ValueError(f"packed payload is for {n} other tensors than the {len(names)} expected")
    fields = bytes(packed["_fields"]).decode().split(",") if packed["_fields"].size else []
    lengths = packed["_lengths"]
    out: dict[str, np.ndarray] = {}
    for j, part in enumerate(fields):
        offsets = np.concatenate([[0], np.cumsum(lengths[:, j])])
        for i, name in enumerate(names):
            out[f"{name}{_FIELD_SEP}{part}"] = packed[part][offsets[i]:offsets[i + 1]]
    return out
