"""Secure aggregation with Flower's SecAgg+: the server learns only the sum of the clients' vectors.

The client side is Flower's own ``secaggplus_mod`` (``flwr.client.mod``), unchanged: it runs the key
agreement, calls the ClientApp for the vector, weights it by the client's example count, quantizes
it, masks it with a private mask and pairwise masks, and later hands out the shares that remove the
masks. The server side is written here on Flower's protocol primitives
(``flwr.common.secure_aggregation``: Shamir shares, key agreement, the mask generator, quantization),
because Flower's ``SecAggPlusWorkflow`` is tied to its legacy ``Strategy`` and ``LegacyContext``
(and, as read in flwr 1.42's ``unmask_stage``, asks for the shares of clients that dropped before
they had shared anything, so a drop in the first two stages fails the round). Here:

* stage 0 (``setup``): every sampled node gets the protocol's parameters and answers two public keys;
  the survivors ``S1`` are arranged on a ring, each with ``num_shares`` neighbours (itself included);
* stage 1 (``share_keys``): each node gets its neighbours' keys (those in ``S1``) and answers
  encrypted Shamir shares of its mask seed and private key for them; survivors ``S2``;
* stage 2 (``collect_masked_vectors``): each node gets the shares addressed to it (from ``S2``) and
  the training message; the mod calls the ClientApp, whose reply (:func:`vector_reply`) holds the
  vector ``x_k`` and ``n_k``, and answers ``mask(q(n_k / W * x_k))``; survivors ``S3``, whose masked
  vectors are summed modulo ``M``;
* stage 3 (``unmask``): each node in ``S3`` gets which of its neighbours are in ``S3`` and which
  dropped after sharing (``S2 - S3``) and answers their shares; the server removes every survivor's
  private mask and the pairwise masks of every dropped node, and dequantizes.

The result is ``sum_k n_k x_k`` and ``sum_k n_k`` over ``S3`` (:class:`SecureSum`), up to the
quantization step ``2 c / T`` per client and entry. A node may drop at any stage as long as at least
``threshold`` share holders of every node are left; otherwise the round fails with the reason.
The mask generator is Flower's (``pseudo_rand_gen``, NumPy's RandomState on a 32-bit seed): this is
a research simulator's secure aggregation, not a production one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

# The records the mod reads from the ClientApp's reply (Flower's legacy "fitres" layout).
FITRES_PARAMETERS = "fitres.parameters"
FITRES_NUM_EXAMPLES = "fitres.num_examples"
FITRES_METRICS = "fitres.metrics"
FITRES_STATUS = "fitres.status"
TRAIN = "train"  # the message type the mod intercepts (every other type passes straight to the app)


class SecAggError(RuntimeError):
    """The round's secure sum cannot be recovered (too few nodes or shares left); says which stage."""


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+'s parameters.

    Attributes
    ----------
    num_shares:
        Neighbours of each node on the ring, itself included (odd; capped at the nodes left after setup).
    threshold:
        Shares needed to rebuild a node's secrets; a node's mask is removable while this many of its
        neighbours survive.
    clipping_range:
        ``c``: each weighted entry ``n_k / W * x_k`` is clipped to ``[-c, c]`` before quantization.
    quantization_range:
        ``T``: the quantization levels over ``[-c, c]`` (step ``2 c / T``).
    modulus_range:
        ``M``: the ring the masked vectors live in; needs ``len(S3) * T < M``.
    max_weight:
        ``W``: the example count that weighs 1 (a power of two keeps ``sum n_k`` exact); counts above
        it are not clipped but widen the range the weighted entries need.
    timeout:
        Seconds each stage waits for replies; a node that does not answer in time has dropped.
    """

    num_shares: int = 5
    threshold: int = 3
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    max_weight: int = 1024
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.threshold < 2 or self.num_shares < self.threshold:
            raise ValueError(f"secure aggregation: threshold={self.threshold} must be >= 2 and <= num_shares="
                             f"{self.num_shares}")
        if not 0 < self.quantization_range < 2**31 or self.modulus_range <= self.quantization_range:
            raise ValueError("secure aggregation: use 0 < quantization_range < 2**31 < modulus_range")


@dataclass
class SecureSum:
    """What the server learns from a round of SecAgg+."""

    weighted_sum: np.ndarray  # sum_k n_k x_k over the contributors (float64)
    total_weight: float  # sum_k n_k over the contributors
    contributors: list[int]  # node ids whose vectors are in the sum (S3)
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> the stage it dropped at
    errors: dict[int, str] = field(default_factory=dict)  # node id -> the error it replied with (if it did)
    replies: dict[int, Message] = field(default_factory=dict)  # S3's stage-2 replies (their other records)


def vector_reply(vector: np.ndarray, num_examples: int, metrics: Mapping[str, float | int] | None = None,
                 ) -> RecordDict:
    """A ClientApp's reply to a training message under SecAgg+: one flat float64 vector and ``n_k``.

    The mod masks the vector (weighted by ``n_k``) and clears it from the reply; ``num_examples`` and
    ``metrics`` travel in the clear.
    """
    return RecordDict({
        FITRES_PARAMETERS: ArrayRecord([np.ascontiguousarray(vector, dtype=np.float64).ravel()]),
        FITRES_NUM_EXAMPLES: MetricRecord({"num_examples": int(num_examples)}),
        FITRES_METRICS: ConfigRecord(dict(metrics or {})),
        FITRES_STATUS: ConfigRecord({"code": 0, "message": ""}),
    })


def is_secure(msg: Message) -> bool:
    """Whether ``msg`` is a stage of SecAgg+ (a training message carrying the protocol's config record)."""
    return msg.metadata.message_type == TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records


def optional_secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a secure round; every other message passes by.

    The ClientApp always has it: whether a round is secure is the server's choice, per message.
    """
    if is_secure(msg):
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def as_vector_reply(content: RecordDict, vector_record: str, metrics_record: str, num_examples_key: str,
                    ) -> RecordDict:
    """A secure round's reply content (the vector in ``vector_record``, the report in ``metrics_record``)
    in the layout the mod reads (:func:`vector_reply`); the report travels in the clear."""
    vector = next(iter(content.array_records[vector_record].values())).numpy()
    metrics = cast(dict[str, float | int], dict(content.metric_records[metrics_record]))
    return vector_reply(vector, int(metrics[num_examples_key]), metrics)


SendAndReceive = Callable[[Iterable[Message], float], Iterable[Message]]


def _message(node: int, configs: dict[str, Any], group_id: str, extra: RecordDict | None = None) -> Message:
    content = RecordDict(dict(extra.items()) if extra is not None else {})
    content[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
    return Message(content=content, dst_node_id=node, message_type=TRAIN, group_id=group_id)


def _exchange(send: SendAndReceive, messages: list[Message], timeout: float, stage: str,
              dropped: dict[int, str], errors: dict[int, str] | None = None) -> dict[int, Message]:
    """Send, keep the replies without error, mark every other destination dropped at ``stage`` (and
    keep an error reply's reason in ``errors``)."""
    asked = {m.metadata.dst_node_id for m in messages}
    good: dict[int, Message] = {}
    replies = list(send(messages, timeout))
    node_of_message = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids set when pushed
    for reply in replies:
        if not reply.has_error():
            good[reply.metadata.src_node_id] = reply
        elif errors is not None:  # a SuperLink answers for a node it lost: named by the message it answers
            node = node_of_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            errors[node] = str(reply.error.reason)
    for node in sorted(asked - set(good)):
        dropped[node] = stage
    return {n: good[n] for n in sorted(good) if n in asked}


def _configs(reply: Message) -> ConfigRecord:
    return reply.content.config_records[RECORD_KEY_CONFIGS]


def secure_sum(send: SendAndReceive, nodes: Sequence[int], training: Mapping[int, RecordDict],
               settings: SecAggSettings, *, group_id: str, rng: random.Random) -> SecureSum:
    """One round of SecAgg+ over ``nodes``; ``training[n]`` is node ``n``'s training message content.

    ``send`` is ``Grid.send_and_receive`` (or a stand-in); ``rng`` places the nodes on the ring.
    Raises :class:`SecAggError` when fewer than ``threshold`` nodes (or shares) are left.
    """
    s, dropped, errors = settings, cast(dict[int, str], {}), cast(dict[int, str], {})
    shares = min(s.num_shares, len(nodes))
    setup = {Key.SAMPLE_NUMBER: len(nodes), Key.SHARE_NUMBER: shares, Key.THRESHOLD: s.threshold,
             Key.CLIPPING_RANGE: float(s.clipping_range), Key.TARGET_RANGE: int(s.quantization_range),
             Key.MOD_RANGE: int(s.modulus_range), Key.MAX_WEIGHT: int(s.max_weight)}
    if len(nodes) < s.threshold:
        raise SecAggError(f"secure aggregation needs at least threshold={s.threshold} nodes, {len(nodes)} sampled")
    # stage 0: public keys
    got = _exchange(send, [_message(n, {Key.STAGE: Stage.SETUP, **setup}, group_id) for n in nodes],
                    s.timeout, Stage.SETUP, dropped, errors)
    keys = {n: (cast(bytes, _configs(r)[Key.PUBLIC_KEY_1]), cast(bytes, _configs(r)[Key.PUBLIC_KEY_2]))
            for n, r in got.items()}
    _enough(keys, s.threshold, Stage.SETUP)
    ring = sorted(keys)
    rng.shuffle(ring)
    half = shares >> 1
    neighbours = {n: {ring[(i + d) % len(ring)] for d in range(-half, half + 1)} for i, n in enumerate(ring)}
    # stage 1: encrypted shares of each node's secrets for its neighbours
    got = _exchange(send, [_message(n, {Key.STAGE: Stage.SHARE_KEYS,
                                        **{str(m): list(keys[m]) for m in neighbours[n]}}, group_id)
                           for n in ring], s.timeout, Stage.SHARE_KEYS, dropped, errors)
    _enough(got, s.threshold, Stage.SHARE_KEYS)
    inbox: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in got}
    for src, reply in got.items():
        cfg = _configs(reply)
        for dst, ctxt in zip(cast(list[int], cfg[Key.DESTINATION_LIST]), cast(list[bytes], cfg[Key.CIPHERTEXT_LIST]),
                             strict=True):
            if dst in inbox:
                inbox[dst][0].append(src)
                inbox[dst][1].append(ctxt)
    shared = set(got)  # S2: nodes whose shares went out
    # stage 2: train, mask, sum
    got = _exchange(send, [_message(n, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: inbox[n][1],
                                        Key.SOURCE_LIST: inbox[n][0]}, group_id, training[n]) for n in sorted(shared)],
                    s.timeout, Stage.COLLECT_MASKED_VECTORS, dropped, errors)
    _enough(got, s.threshold, Stage.COLLECT_MASKED_VECTORS)
    total: list[np.ndarray] | None = None
    for reply in got.values():
        masked = [bytes_to_ndarray(b) for b in cast(list[bytes], _configs(reply)[Key.MASKED_PARAMETERS])]
        total = masked if total is None else parameters_mod(parameters_addition(total, masked), s.modulus_range)
    assert total is not None
    survivors = set(got)  # S3
    stage_two = got
    # stage 3: shares that remove the masks
    lost = shared - survivors
    got = _exchange(send, [_message(n, {Key.STAGE: Stage.UNMASK,
                                        Key.ACTIVE_NODE_ID_LIST: sorted(neighbours[n] & survivors),
                                        Key.DEAD_NODE_ID_LIST: sorted(neighbours[n] & lost)}, group_id)
                           for n in sorted(survivors)], s.timeout, Stage.UNMASK, dropped, errors)
    collected: dict[int, list[bytes]] = {n: [] for n in shared}
    for reply in got.values():
        cfg = _configs(reply)
        for owner, share in zip(cast(list[int], cfg[Key.NODE_ID_LIST]), cast(list[bytes], cfg[Key.SHARE_LIST]),
                                strict=True):
            collected[owner].append(share)
    shapes = [a.shape for a in total]
    for owner, owner_shares in sorted(collected.items()):
        if len(owner_shares) < s.threshold:
            raise SecAggError(f"secure aggregation, stage {Stage.UNMASK}: only {len(owner_shares)} shares of node "
                              f"{owner}'s secret came back, threshold={s.threshold}; the sum cannot be unmasked")
        secret = combine_shares(owner_shares)
        if owner in survivors:  # its private mask
            total = parameters_subtraction(total, pseudo_rand_gen(secret, s.modulus_range, shapes))
            continue
        for other in sorted((neighbours[owner] - {owner}) & survivors):  # a dropped node's pairwise masks
            key = generate_shared_key(bytes_to_private_key(secret), bytes_to_public_key(keys[other][0]))
            mask = pseudo_rand_gen(key, s.modulus_range, shapes)
            # the survivor added +mask if its id was the larger, -mask otherwise; undo it
            total = parameters_addition(total, mask) if owner > other else parameters_subtraction(total, mask)
    total = parameters_mod(total, s.modulus_range)
    q_total, vector = factor_extract(total)
    weighted = dequantize(vector, s.clipping_range, s.quantization_range)[0].astype(np.float64)
    weighted += -(len(survivors) - 1) * s.clipping_range  # each survivor's shift by +c, but one
    return SecureSum(weighted_sum=weighted * s.max_weight, total_weight=float(q_total) * s.max_weight
                     / s.quantization_range, contributors=sorted(survivors), dropped=dropped, errors=errors,
                     replies=dict(stage_two))


def _enough(alive: Mapping[int, Any], threshold: int, stage: str) -> None:
    if len(alive) < threshold:
        raise SecAggError(f"secure aggregation, stage {stage}: {len(alive)} node(s) left, fewer than "
                          f"threshold={threshold}; the round cannot complete")
