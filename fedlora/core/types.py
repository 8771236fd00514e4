"""The pure data types every strategy speaks (torch and the standard library only).

Notation (algorithms.md): a LoRA-adapted linear layer has a frozen weight ``W0`` of shape
``(m, n)`` (out, in); client ``k`` trains ``A_k`` of shape ``(r_k, n)`` and ``B_k`` of shape
``(m, r_k)``; its contribution to the layer is ``s_k * B_k @ A_k`` with ``s_k = alpha_k / r_k``.

An *adapter state* is a flat ``dict[str, Tensor]`` keyed like peft's
``get_peft_model_state_dict`` (adapter name removed): ``"<module>.lora_A.weight"`` and
``"<module>.lora_B.weight"`` for each adapted module, plus every other trainable tensor (for
example the classification head), which strategies average by example weight.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

Tensor = torch.Tensor
AdapterState = dict[str, Tensor]
# An encoded update: named numpy arrays of any dtype (what a compressor puts on the wire).
Payload = dict[str, np.ndarray]


class LoraPair(NamedTuple):
    """One module's LoRA factors, always in this order: ``a`` ``(r, n)``, then ``b`` ``(m, r)``.

    The module's update is ``b @ a`` (times the scaling ``s`` for an adapter; a base merge has its
    scaling folded in).
    """

    a: Tensor
    b: Tensor


# A factored update to add to the frozen base weights: module -> (A_st (R, n), B_st (m, R)),
# scaling already folded in, so the dense update is exactly ``B_st @ A_st``.
BaseMerge = dict[str, LoraPair]


@dataclass(frozen=True)
class RankPruning:
    """HetLoRA's local rank self-pruning (Cho et al., EMNLP 2024), asked of a client by its plan.

    The client adds ``weight * sum_modules ||B[:, t:r] A[t:r, :]||_F`` to its training loss, with ``r`` its
    rank and ``t = max(min_rank, floor(gamma * r))`` (:func:`fedlora.core.lora_math.pruned_rank`); when that
    tail norm is smaller after training than at the start, it keeps only the first ``t`` slots: it sends
    them and reports rank ``t``, and the server plans it at ``t`` from then on.
    """

    gamma: float = 0.99
    weight: float = 0.01
    min_rank: int = 2


@dataclass(frozen=True)
class ClientPlan:
    """What the server sends one client for one round (the downlink, before encoding).

    Attributes
    ----------
    rank:
        The client's LoRA rank ``r_k`` (its resource tier).
    adapter:
        The adapter the client starts from, already at ``rank``. ``None`` means "start a fresh
        adapter": ``A`` drawn by :func:`fedlora.core.lora_math.init_lora_a` from
        ``init_seed`` and ``B = 0``; the non-LoRA tensors (head) then come from ``head``.
    init_seed:
        Seed of the fresh or shared ``A`` (FLoRA re-initialisation, FFA-LoRA's frozen ``A``).
    train_lora_a:
        ``False`` freezes ``A`` during local training (FFA-LoRA, RoLoRA's ``B`` rounds).
    train_lora_b:
        ``False`` freezes ``B`` during local training (RoLoRA's ``A`` rounds). A frozen factor is
        never sent back: the server has it (it is the plan's).
    send_lora_a:
        ``False`` keeps ``A`` off the wire in both directions: the receiver regenerates it from
        ``init_seed``. Only valid when ``A`` is a pure function of the seed.
    head:
        Non-LoRA trainables to start from when ``adapter`` is ``None``.
    personal:
        ``""``: nothing is the client's own. Otherwise the client's ``B`` factors and non-LoRA trainables
        (the head) are its own and never leave it (FedSA-LoRA): only ``A`` travels, both ways.
        :data:`PERSONAL_KEPT`: the client starts them from what it kept after its last round (the
        plan carries only ``A``); :data:`PERSONAL_START`: the plan carries them too, for a client that
        holds none yet (the platform sends this on a client's first round; a client that holds its own
        starts from those anyway).
    prune:
        HetLoRA's rank self-pruning (:class:`RankPruning`), or ``None``: the client may then reply at a
        smaller rank than ``rank`` (the first slots of what it trained).
    """

    rank: int
    adapter: AdapterState | None
    init_seed: int
    train_lora_a: bool = True
    send_lora_a: bool = True
    head: AdapterState = field(default_factory=dict)
    train_lora_b: bool = True
    personal: str = ""
    prune: RankPruning | None = None


PERSONAL_KEPT = "kept"  # ClientPlan.personal: the client's own B and head, from what it kept
PERSONAL_START = "start"  # ClientPlan.personal: its own from now on, starting from the plan's


@dataclass(frozen=True)
class ClientUpdate:
    """What the server knows about one client after it trained (decoded uplink).

    ``state`` is the complete trained adapter at ``rank``: when ``A`` was not sent (FFA-LoRA)
    the server has filled it in from the plan, and compressed uplinks are already decoded.
    """

    client_id: int
    rank: int
    scaling: float
    num_examples: int
    state: AdapterState


@dataclass(frozen=True)
class AggregateResult:
    """A strategy's answer for one round.

    Attributes
    ----------
    adapter:
        The new global adapter at the largest rank ``r_max`` (what the server evaluates and
        what ``plan`` truncates per client).
    merge:
        A factored update that the platform adds to the base weights of every model (server
        and clients) from the next round on, or ``None``. Scaling is folded in.
    state:
        Strategy state carried to the next round (must be tensors, so it checkpoints).
    metrics:
        Scalars logged in ``metrics.jsonl`` for this round.
    """

    adapter: AdapterState
    merge: BaseMerge | None = None
    state: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterSpec:
    """The shape of the federated adapter: what a strategy needs to build round-0 state.

    Attributes
    ----------
    modules:
        Adapted module name -> ``(m, n)`` = (out_features, in_features).
    r_max:
        The largest client rank; global factors are kept at this rank.
    scaling:
        ``s = lora_alpha / r`` of the global adapter (the platform keeps it equal at every rank).
    head:
        Initial values of the non-LoRA trainables (for example the classifier).
    """

    modules: Mapping[str, tuple[int, int]]
    r_max: int
    scaling: float
    head: AdapterState


@runtime_checkable
class Strategy(Protocol):
    """A server-side aggregation method over LoRA adapters (pure, no I/O).

    The platform calls :meth:`init` once, then every round :meth:`plan` for each sampled client
    and :meth:`aggregate` with the decoded replies. Global state is passed in and returned, never
    hidden on ``self``, so runs checkpoint and resume exactly.

    Attributes
    ----------
    fresh_adapters:
        Whether every round's client adapter starts with fresh LoRA factors (``plan.adapter`` is
        ``None``: FLoRA) rather than continuing from the global ones. A compressor's error
        feedback cannot carry a residual across fresh factors; the configuration check reads this.
    linear:
        Whether the aggregate is a weighted mean of per-client images, each a function of one
        client's update alone (``aggregate`` of that update by itself): what client-level DP
        (:mod:`fedlora.core.privacy`: clip each image's change, sum, noise) and secure aggregation (the
        server sees only the sum) need. FedAvg with zero-padding, FFA-LoRA and RoLoRA are; a method that
        needs each client's product ``B_k A_k`` or stacks the clients' factors is not.
    why_not_linear:
        When not ``linear``: what the aggregate needs from individual clients (shown when a privacy
        mode that needs linearity is refused); empty otherwise.

    A strategy may also set ``personalized = True`` (read with ``getattr``, default ``False``): its plans
    keep each client's ``B`` and head on the client (``ClientPlan.personal``), so there is no global
    model: the platform evaluates each client's own model on its own held-out examples instead.
    """

    fresh_adapters: bool
    linear: bool
    why_not_linear: str

    def init(self, spec: AdapterSpec, seed: int) -> AggregateResult:
        """Return the round-0 global adapter (at ``spec.r_max``) and strategy state."""
        ...

    def plan(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        *,
        client_id: int,
        rank: int,
        server_round: int,
        seed: int,
    ) -> ClientPlan:
        """Return what client ``client_id`` (of rank ``rank``) starts from this round."""
        ...

    def aggregate(
        self,
        global_adapter: AdapterState,
        state: Mapping[str, Tensor],
        updates: Sequence[ClientUpdate],
        *,
        server_round: int,
    ) -> AggregateResult:
        """Combine the clients' trained adapters into the next global adapter."""
        ...


@runtime_checkable
class Compressor(Protocol):
    """A codec for what a client uploads: its round update, per tensor, with optional error feedback.

    The client compresses ``delta`` (trained minus start) plus the residual it kept from its last
    round; the server decodes the payload and adds it to the start adapter. Implementations live
    in :mod:`fedlora.compression`, one module each, selected by ``_target_`` in
    ``conf/compression/``.

    Attributes
    ----------
    error_feedback:
        Whether what compression dropped is carried into the next round's update.
    """

    error_feedback: bool

    def compress(
        self, delta: Mapping[str, Tensor], residual: Mapping[str, Tensor] | None,
        continuing: Collection[str] | None = None, *, seed: int | None = None,
    ) -> tuple[Payload, AdapterState]:
        """Encode ``delta + residual``; return the payload and the residual to keep.

        ``continuing`` names the tensors that continue from the global adapter next round (not
        fresh LoRA factors; ``None``: all): only their residual can be carried, and only with
        error feedback. ``seed`` drives a randomised codec's choices (random-k); a deterministic
        one ignores it.
        """
        ...

    def decode(self, payload: Mapping[str, np.ndarray]) -> AdapterState:
        """Return the update the payload encodes, per tensor, in float32."""
        ...
