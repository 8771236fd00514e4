r"""Downlink compression: the server compresses what it sends, and always knows what each client holds.

Without it, every training message carries the client's start adapter in full (the global factors
at the client's rank and the classifier head). With a downlink compressor (``downlink=compeft``),
the server keeps a **mirror** of the copy ``H_k`` that client ``k`` holds and sends only the
compressed difference between the start it wants the client to have, ``T_k`` (the strategy's plan),
and that copy:

.. math::

    m_k = C(T_k - H_k), \qquad H_k \leftarrow H_k + D(m_k),

on both ends, with the same float32 operations, so the client's copy and the server's mirror are
equal bit for bit. The client trains from ``H_k``; the server adds its update (what it trained minus
``H_k``) to the start it planned, ``T_k`` (:func:`fedlora.federation.wire.base`), so the server's model
moves by the clients' updates exactly, and every check of a reply sees that update. This is EF21's
rule (Richtárik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically
Faster Error Feedback", NeurIPS 2021) applied to the model the server sends, EF21-P (Gruntkowska,
Tyurin, Richtárik, "EF21-P and Friends", ICML 2023): what compression dropped is not stored as a
residual but stays in ``T_k - H_k``, and the next message compresses it again together with the new
change. (Adding the update to ``H_k`` instead would make the next target ``H_k`` plus the updates and
drop each round's compression error from the model for good; fedlora did that until 2026-12-05, and
``tests/federation/test_downlink.py`` now checks that the model moves by the updates exactly.) Why this
rule and not ComPEFT's residual (EF14):

* **It survives partial participation.** A client that sat out rounds is sent the difference from
  the copy it holds, however old: the message is one compressed tensor per tensor whatever the
  staleness, and the error never goes stale (EF14's residual describes a model that has since moved).
* **It needs a contractive compressor**, ``||x - C(x)||^2 <= (1 - delta) ||x||^2``, for the copy to
  converge to the target; ComPEFT's top-k with ``scale=mean_abs`` (the L2-optimal scale on the
  support) or ``scale=none`` is; ``scale=std`` with ``alpha`` is not in general (at ``alpha = 4`` a kept
  entry can overshoot), so the configuration check refuses it for the downlink.
* **Any strategy's plan works**: the mirror is per client and per tensor of its start, so a plan that
  truncates the global factors (FedAvg, LoRA-FAIR), regenerates ``A`` (FFA-LoRA) or gives each client
  its own SVD slice (FlexLoRA) is compressed the same way. Clients sampled in the same rounds at the
  same rank hold the same copy; a client that sat out holds an older approximation until its next
  message, as the rule says.

**First contact.** A client with no copy (its first round, or a plan of another shape) starts from a
reference both ends can build: ``A`` from the plan's ``init_seed``, ``B = 0`` (a fresh adapter at its
rank) and the non-LoRA tensors (the head) sent exactly; the compressed difference from it follows.
For the strategies that start their global adapter from the run seed (FedAvg, LoRA-FAIR, FFA-LoRA,
RoLoRA) the reference *is* round 1's start, so round 1 sends only the head.

**Which copy.** The message names the round of the copy it is relative to and its CRC-32. The server
moves its mirror only when the client's reply arrives (a client that failed, or whose reply was lost,
may or may not have applied it), so a client keeps every copy from the one the server last named on
(:func:`keep_views`); a copy it does not hold is an error that names the round, and the server then
starts it again from the reference.

**The control variate.** Under controlled averaging with the drift correction (``compression=scafcom``,
:mod:`fedlora.core.control`) the client also needs the server's ``c`` at its rank. It travels in the
same message: the copy holds ``control/<key>`` next to the start's tensors (:func:`with_control`), the
same rule moves it, its first-contact reference is zero (where ``c`` starts), and the client corrects its
drift with its copy ``c_hat_k``. The server decodes that client's reply with the same ``c_hat_k``
(``T_k + eta_g (c_hat_k + d_k)``), so the update it adds is the one the client's rule formed, while
``c`` itself moves by the decoded messages exactly (it stays ``sum_i w_i c_i``).

What travels per round, per client: one compressed payload over the tensors of its start that the
plan sends (:func:`fedlora.federation.wire.downlink_keys`) and, under SCAFCOM, of ``c``, plus, at first
contact, the head. Base
merges (FLoRA, FedEx-LoRA) are not compressed: a strategy whose clients start fresh LoRA factors
(FLoRA) is refused, since its downlink is its merges.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, ClientPlan, Compressor, Payload, Tensor

LOST = "downlink copy lost"  # starts the error a client replies with when it lacks the copy a message names
CONTROL = "control/"  # a copy's tensors of the server's control variate c: "control/<key>" (compression=scafcom)


@dataclass(frozen=True)
class Downlink:
    """One compressed downlink message, and the copy it leaves the client with (both ends hold it).

    Attributes
    ----------
    base_round:
        The round of the copy the message is relative to (0: the first-contact reference).
    base_crc:
        CRC-32 of that copy (:func:`crc`), which the client checks before it applies the message.
    payload:
        The compressor's encoding of ``target - base``, over the tensors of ``view``.
    dense:
        The tensors sent exactly at first contact (the head); empty otherwise.
    view:
        The copy after this message: ``base + decode(payload)``, what the client starts from.
    """

    base_round: int
    base_crc: int
    payload: Payload
    dense: AdapterState
    view: AdapterState


def crc(view: Mapping[str, Tensor]) -> int:
    """CRC-32 of a copy: every tensor's name, shape and float32 bytes, in name order."""
    value = 0
    for key in sorted(view):
        t = view[key].detach().contiguous()
        value = zlib.crc32(f"{key}:{tuple(t.shape)}".encode(), value)
        value = zlib.crc32(t.numpy().tobytes(), value)
    return value


def reference(plan: ClientPlan, modules: Mapping[str, tuple[int, int]], dense: Mapping[str, Tensor],
              names: Sequence[str]) -> AdapterState:
    """The first-contact copy: a fresh adapter at the plan's rank from its ``init_seed``, with ``dense``
    as its non-LoRA tensors, restricted to ``names``; zeros for the control variate's (:data:`CONTROL`)."""
    fresh = lm.fresh_state(modules, plan.rank, plan.init_seed, dense)
    return {k: torch.zeros_like(fresh[k[len(CONTROL):]], dtype=torch.float32) if k.startswith(CONTROL) else fresh[k]
            for k in names}


def with_control(start: Mapping[str, Tensor], control: Mapping[str, Tensor]) -> AdapterState:
    """The copy's target: the start's tensors and the control variate's, as ``control/<key>``."""
    return {**start, **{CONTROL + k: v for k, v in control.items()}}


def split_view(view: Mapping[str, Tensor]) -> tuple[AdapterState, AdapterState]:
    """A copy's ``(start tensors, control variate)`` (the second empty when it holds none)."""
    control = {k[len(CONTROL):]: v for k, v in view.items() if k.startswith(CONTROL)}
    return {k: v for k, v in view.items() if not k.startswith(CONTROL)}, control


def apply(base: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> AdapterState:
    """``base + update`` per tensor, in float32 (the one expression both ends evaluate)."""
    return {k: (base[k] + update[k].reshape(base[k].shape)).to(base[k].dtype) for k in base}


def _same_layout(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def encode(compressor: Compressor, target: Mapping[str, Tensor], plan: ClientPlan,
           modules: Mapping[str, tuple[int, int]], held: tuple[int, AdapterState] | None) -> Downlink:
    """The server's message to a client that holds ``held`` (``(round, copy)``; ``None``: nothing).

    ``target`` is the start the plan gives the client, over the tensors the plan sends. A copy of
    another layout (the plan's tensors or shapes changed) counts as none.
    """
    names = sorted(target)
    if held is not None and _same_layout(held[1], target):
        base_round, base, dense = held[0], held[1], {}
    else:
        dense = {k: target[k].clone() for k in names if not lm.is_lora_key(k) and not k.startswith(CONTROL)}
        base_round, base = 0, reference(plan, modules, dense, names)
    diff = {k: target[k] - base[k] for k in names}
    payload, _ = compressor.compress(diff, None, ())
    view = apply(base, compressor.decode(payload))
    return Downlink(base_round, crc(base), payload, dense, view)


def decode(compressor: Compressor, payload: Mapping[str, np.ndarray], *, base_round: int, base_crc: int,
           dense: Mapping[str, Tensor], plan: ClientPlan, modules: Mapping[str, tuple[int, int]],
           names: Sequence[str], views: Mapping[int, AdapterState]) -> AdapterState:
    """The client's side of :func:`encode`: the copy the message leaves it with.

    Raises
    ------
    ValueError
        Starting with :data:`LOST` when the client does not hold the copy the message is relative to
        (or holds another one: its CRC differs).
    """
    if base_round == 0:
        base = reference(plan, modules, dense, names)
    elif base_round in views:
        base = views[base_round]
    else:
        raise ValueError(f"{LOST}: the message is relative to this client's copy of round {base_round}, and it "
                         f"holds copies of rounds {sorted(views) or 'none'}; the server starts it again from "
                         "the reference next round")
    if crc(base) != base_crc:
        raise ValueError(f"{LOST}: this client's copy of round {base_round} differs from the server's (CRC "
                         f"{crc(base):#010x}, expected {base_crc:#010x}); the server starts it again from the "
                         "reference next round")
    return apply(base, compressor.decode(payload))


def keep_views(views: Mapping[int, AdapterState], base_round: int, server_round: int,
               view: AdapterState) -> dict[int, AdapterState]:
    """The copies a client keeps after applying round ``server_round``'s message relative to ``base_round``:
    the new one and every one from ``base_round`` on (the server may still name them), none older; after
    a first-contact message (``base_round == 0``) only the new one."""
    kept = {r: v for r, v in views.items() if base_round > 0 and base_round <= r != server_round}
    kept[server_round] = view
    return kept
