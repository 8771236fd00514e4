r"""Controlled averaging with compression: SCAFCOM and SCALLION's update rules, on adapter states.

Huang, X., Li, P., Li, X. "Stochastic Controlled Averaging for Federated Learning with Communication
Compression." ICLR 2024 (arXiv:2308.08165). Both methods are SCAFFOLD (Karimireddy et al. 2020) in its
single-vector form, with each client's message compressed:

* every client ``k`` keeps a control variate ``c_k`` (and, for SCAFCOM, a momentum ``v_k``); the server
  keeps ``c = (1/N) sum_i c_i`` over all ``N`` clients, sampled or not (see below for weights);
* in a round, the sampled clients train from the global model ``x`` with the drift correction ``c - c_k``
  added at every local step, and form ``h_k``, their local steps' own contribution (for SGD, ``K eta``
  times the mean local gradient);
* SCAFCOM (biased, contractive compressors ``C``: top-k, ComPEFT): ``v_k <- (1 - beta) v_k + beta h_k``,
  send ``d_k = C(v_k - c_k)``, ``c_k <- c_k + d_k``;
  SCALLION (unbiased ``C``): send ``d_k = C(h_k - c_k)``, ``c_k <- c_k + alpha d_k``;
* the server: ``x <- x + eta_g (c + mean_S d_k)`` and ``c <- c + (alpha / N) sum_S d_k``.

(fedlora weighs clients like the strategy does: ``c = sum_i w_i c_i`` with ``w_i = n_i / sum_j n_j`` over every
client under example weighting, ``1/N`` the paper's uniform case, and the strategy's ``p_k`` in the mean over
``S``; :func:`advance_control`.)

With the identity compressor, ``beta = 1`` and ``alpha = 1`` both are SCAFFOLD (and with ``eta_g = 1``
and every client sampled, ``x`` moves by the mean of the clients' displacements, like FedAvg; only the
drift correction differs).

**Units.** The paper states the rule in gradients (``c_k`` estimates client ``k``'s gradient, a local
step is ``y <- y - eta (g - c_k + c)``). Here every quantity is a *displacement* of the adapter over
one round: ``c_k`` estimates the displacement client ``k``'s own local steps produce in a round (the
gradient version times ``-K eta``). A client adds ``(c - c_k) / K`` after each of its ``K`` optimiser
steps (for SGD this is exactly SCAFFOLD's corrected step; for AdamW it is the correction applied like
decoupled weight decay, outside the adaptive scaling), so its round displacement is
``u_k = h_k + (c - c_k)`` and ``h_k = u_k - (c - c_k)`` is what its optimiser did. This keeps the
method independent of the local optimiser and of its learning rate, and the server step ``eta_g``
dimensionless: ``eta_g = 1`` is the paper's ``eta_g eta_l K`` at the local step size the clients used.

**Aggregation.** The server turns each reply into the adapter ``start_k + eta_g (c + d_k)`` (at the
client's rank) and hands those to the strategy: for a strategy whose aggregate is a weighted mean of what
clients send (FedAvg with zero-padding, FFA-LoRA, RoLoRA) the result is ``x + eta_g (c + sum_S p_k d_k)``,
the paper's rule with the strategy's weights ``p_k`` (example counts by default) in place of the uniform
mean. The control variate is ``c = sum_i w_i c_i`` with the same weighting over every client (the paper's
uniform ``1/N`` when clients are weighted equally).

Everything here is pure tensor algebra on ``{tensor name: tensor}`` maps (torch only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, Tensor

OWN = "control/"  # a client's c_k in its state file
MOMENTUM = "momentum/"  # a client's v_k (SCAFCOM)


@dataclass(frozen=True)
class ControlSettings:
    """The method's constants.

    Attributes
    ----------
    momentum:
        ``beta`` in ``(0, 1]``: the weight of the round's ``h_k`` in ``v_k`` (SCAFCOM); ``1`` sends
        ``C(h_k - c_k)`` (SCALLION, SCAFFOLD).
    control_step:
        ``alpha`` in ``(0, 1]``: how far ``c_k`` (and ``c``) move by the decoded message (SCALLION's
        ``alpha``; SCAFCOM uses ``1``).
    server_lr:
        ``eta_g > 0``: the server's step along ``c + mean_S d_k``, in units of one round's displacement.
    correct_drift:
        Whether clients train with the drift correction ``c - c_k`` (SCAFCOM, SCALLION; the server then sends
        ``c``). ``False`` keeps the rest: each client's ``c_k`` tracks its (momentum) update through compressed
        differences, and the server steps along ``c + mean_S d_k``; this is EF21's error feedback for partial
        participation (``c_k`` does not go stale while a client sits out, unlike a residual), at no downlink cost.
    """

    momentum: float = 1.0
    control_step: float = 1.0
    server_lr: float = 1.0
    correct_drift: bool = True

    def __post_init__(self) -> None:
        for name, value, fix in (("momentum", self.momentum, "1 turns the momentum off"),
                                 ("control_step", self.control_step, "use 1 (SCAFCOM) or the density (SCALLION)")):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"compression.{name}={value!r} must be a number in (0, 1]; {fix}")
        lr = self.server_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"compression.server_lr={lr!r} must be a finite number > 0; use 1.0")
        if not isinstance(self.correct_drift, bool):
            raise ValueError(f"compression.drift_correction={self.correct_drift!r} must be true or false")


@dataclass(frozen=True)
class ClientMessage:
    """What a client computes in a round before compressing: the vector it compresses and its new momentum."""

    target: AdapterState  # v_k - c_k (SCAFCOM) or h_k - c_k (SCALLION): compressed and sent
    momentum: AdapterState  # v_k after this round (h_k itself when beta = 1)


def split_client_state(state: Mapping[str, Tensor] | None) -> tuple[AdapterState, AdapterState]:
    """A client's ``(c_k, v_k)`` from the flat state it keeps (empty maps for a client that holds none)."""
    own = {k[len(OWN):]: v for k, v in (state or {}).items() if k.startswith(OWN)}
    momentum = {k[len(MOMENTUM):]: v for k, v in (state or {}).items() if k.startswith(MOMENTUM)}
    return own, momentum


def join_client_state(own: Mapping[str, Tensor], momentum: Mapping[str, Tensor]) -> AdapterState:
    """The flat state a client keeps: ``control/<key>`` and ``momentum/<key>``."""
    return {**{OWN + k: v for k, v in own.items()}, **{MOMENTUM + k: v for k, v in momentum.items()}}


def _or_zero(state: Mapping[str, Tensor], key: str, like: Tensor) -> Tensor:
    value = state.get(key)
    if value is None:
        return torch.zeros_like(like, dtype=torch.float32)
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"control state for {key!r} has shape {tuple(value.shape)}, the update {tuple(like.shape)}")
    return value.to(torch.float32)


def drift(control: Mapping[str, Tensor], own: Mapping[str, Tensor]) -> AdapterState:
    """The round's drift correction ``c - c_k`` for every tensor the server sent ``c`` of (zeros for a
    ``c_k`` the client has not formed yet)."""
    return {k: c.to(torch.float32) - _or_zero(own, k, c) for k, c in control.items()}


def client_message(update: Mapping[str, Tensor], correction: Mapping[str, Tensor], own: Mapping[str, Tensor],
                   momentum: Mapping[str, Tensor], settings: ControlSettings) -> ClientMessage:
    """The vector to compress: ``h_k = u_k - (c - c_k)``, ``v_k <- (1 - beta) v_k + beta h_k``, ``v_k - c_k``.

    ``update`` is the round's displacement ``u_k`` (trained minus start) of every tensor sent;
    ``correction`` the ``c - c_k`` applied during training (:func:`drift`).
    """
    beta = float(settings.momentum)
    target: AdapterState = {}
    new_momentum: AdapterState = {}
    for key, u in update.items():
        u32 = u.to(torch.float32)
        h = u32 - _or_zero(correction, key, u32)
        v = h if beta == 1.0 else (1.0 - beta) * _or_zero(momentum, key, u32) + beta * h
        new_momentum[key] = v
        target[key] = v - _or_zero(own, key, u32)
    return ClientMessage(target, new_momentum)


def advance_own(own: Mapping[str, Tensor], decoded: Mapping[str, Tensor], settings: ControlSettings) -> AdapterState:
    """``c_k <- c_k + alpha d_k`` for every tensor sent (the others keep theirs)."""
    out = dict(own)
    for key, d in decoded.items():
        out[key] = _or_zero(own, key, d) + float(settings.control_step) * d.to(torch.float32)
    return out


def effective_update(start: Mapping[str, Tensor], control: Mapping[str, Tensor], decoded: Mapping[str, Tensor],
                     settings: ControlSettings) -> AdapterState:
    """What the server hands the strategy for one reply: ``start_k + eta_g (c + d_k)`` per tensor sent (``c`` at
    the client's rank, as it was sent)."""
    lr = float(settings.server_lr)
    return {k: start[k] + lr * (_or_zero(control, k, d) + d.to(torch.float32)).reshape(start[k].shape)
            for k, d in decoded.items()}


def advance_control(control: Mapping[str, Tensor], decoded: Sequence[Mapping[str, Tensor]],
                    weights: Sequence[float], settings: ControlSettings) -> AdapterState:
    """The server's ``c <- c + alpha sum_S w_k d_k``, each ``d_k`` zero-padded to ``c``'s rank (a client of
    rank ``r_k`` moves only its first ``r_k`` slots, as its own ``c_k`` does).

    ``w_k`` is client ``k``'s weight in the whole population (the paper's ``1/N``; with the strategy's example
    weighting ``n_k / sum_i n_i`` over every client, sampled or not), so that ``c = sum_i w_i c_i`` is the
    control variate of the objective the strategy's weights minimise. With uniform weights any mix of
    ``c`` and the step's weights is the paper's; with example weights a uniform ``c`` would leave EF21's step
    (no drift correction) biased by ``c - sum_S p_k c_k`` every round.

    Raises
    ------
    ValueError
        For a ``d_k`` tensor that ``control`` does not hold, or weights that do not match the messages.
    """
    if len(weights) != len(decoded):
        raise ValueError(f"{len(weights)} weights for {len(decoded)} messages")
    out = {k: v.clone() for k, v in control.items()}
    for message, w in zip(decoded, weights, strict=True):
        weight = float(settings.control_step) * float(w)
        for key, d in message.items():
            if key not in out:
                raise ValueError(f"a client sent {key!r}, which the server's control variate does not hold")
            out[key] = out[key] + weight * pad_to(d.to(torch.float32), key, tuple(out[key].shape))
    return out


def pad_to(value: Tensor, key: str, shape: tuple[int, ...]) -> Tensor:
    """``value`` zero-padded to ``shape`` in its rank slots (:func:`fedlora.core.lora_math.pad_key`)."""
    return lm.pad_key(key, value, shape, "the control variate")


def control_of(compressor: object) -> ControlSettings | None:
    """The control settings of a controlled compressor (``compression=scafcom``); ``None`` for any other."""
    control = getattr(compressor, "control", None)
    return control if isinstance(control, ControlSettings) else None
