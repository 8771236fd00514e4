"""SCAFCOM (and SCALLION's control step): controlled averaging whose client messages are ComPEFT-coded.

Huang, Li, Li, "Stochastic Controlled Averaging for Federated Learning with Communication Compression"
(ICLR 2024). The update rule, its units and how it composes with a strategy are in
:mod:`fedlora.core.control`; this module is the codec side: what a client compresses is
``v_k - c_k`` (not its round delta), coded with ComPEFT's top-k and ternary scale
(:class:`~fedlora.compression.compeft.ComPEFT`), and there is no separate residual: ``c_k`` tracks what
the server has received from the client (``c_k <- c_k + d_k``), so what compression dropped stays in the
next round's ``v_k - c_k``, EF21's rule, which unlike a residual does not go stale while the client sits
out rounds (the paper's point for partial participation).

The scale must make ``C`` contractive (``E||C(v) - v||^2 <= (1 - delta) ||v||^2``) for SCAFCOM's guarantee:
``scale="mean_abs"`` (the L2-optimal scale on the kept entries) is, ComPEFT's ``std`` rule need not be, so
``mean_abs`` is the default here and ``std`` is refused. ``scale="none"`` with ``density=1`` is the identity.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import ClassVar

import numpy as np
import torch

from fedlora.compression.compeft import ComPEFT
from fedlora.compression.randk import RandK
from fedlora.core.control import ControlSettings
from fedlora.core.types import AdapterState, Payload


class SCAFCOM:
    """SCAFCOM's client messages, ComPEFT-coded; the control settings travel with it to both ends.

    Parameters
    ----------
    density, scale, alpha:
        ComPEFT's (:class:`~fedlora.compression.compeft.ComPEFT`); ``scale`` is ``mean_abs`` or ``none``.
    momentum:
        SCAFCOM's ``beta`` in ``(0, 1]`` (``1``: no momentum, SCALLION's message).
    control_step:
        SCALLION's ``alpha`` in ``(0, 1]`` (``1`` for SCAFCOM).
    server_lr:
        The server's step ``eta_g`` (``1``: a round moves the model by the clients' mean displacement).
    codec:
        ``"compeft"`` (top-k and ternary: biased, contractive; SCAFCOM) or ``"rand_k"`` (unbiased random-k,
        :mod:`fedlora.compression.randk`; SCALLION, with ``momentum=1`` and ``control_step <= density``).
    drift_correction:
        ``True``: clients train with ``c - c_k`` (SCAFCOM). ``False``: no correction and no ``c`` on the
        downlink; what is left is EF21's error feedback under partial participation (``compression=ef21``).
    """

    error_feedback = False  # c_k is the feedback (EF21's rule); no residual is kept
    # what it cannot run under, by privacy mode, with the reason and the fix (fedlora.config.validate reads it)
    privacy_refusals: ClassVar[Mapping[str, str]] = {
        "dp_sgd": "its drift correction is added outside Opacus' DP-SGD step, so it is not part of the DP "
                  "mechanism; use compression=compeft with differential privacy",
        "dp_fedavg": "its server step x + eta_g (c + mean d_k) is not the clipped, noised sum of client-level DP; "
                     "use compression=compeft with differential privacy",
        "secure": "under secure aggregation each update is masked into a dense vector of integers, so its code "
                  "saves nothing and the server could not move c by each client's decoded message; use "
                  "compression=none with privacy.secure=true"}

    def __init__(self, *, density: float = 0.1, scale: str = "mean_abs", alpha: float = 1.0, momentum: float = 1.0,
                 control_step: float = 1.0, server_lr: float = 1.0, drift_correction: bool = True,
                 codec: str = "compeft") -> None:
        self.codec: ComPEFT | RandK
        if codec == "rand_k":  # SCALLION's unbiased compressor
            if scale != "mean_abs" or alpha != 1.0:
                raise ValueError(f"compression.scale={scale!r} and compression.alpha={alpha!r} are ComPEFT's; "
                                 "random-k sends exact values scaled by n / k: remove them with codec=rand_k")
            self.codec = RandK(density=density)
        elif codec == "compeft":
            if scale == "std":
                raise ValueError("compression.scale='std' is not contractive (its step alpha * std need not shrink "
                                 "||C(v) - v||), which SCAFCOM's control variates need; use scale=mean_abs (or none)")
            self.codec = ComPEFT(density=density, scale=scale, alpha=alpha, error_feedback=False)
        else:
            raise ValueError(f"compression.codec={codec!r} is not one of ('compeft', 'rand_k'); use compeft (SCAFCOM: "
                             "top-k, biased) or rand_k (SCALLION: unbiased)")
        self.codec_name, self.density, self.scale, self.alpha = codec, float(density), scale, float(alpha)
        self.control = ControlSettings(momentum=momentum, control_step=control_step, server_lr=server_lr,
                                       correct_drift=drift_correction)

    def compress(self, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None,
                 continuing: Collection[str] | None = None, *, seed: int | None = None,
                 ) -> tuple[Payload, AdapterState]:
        """Encode ``delta`` (here the client's ``v_k - c_k``); no residual (``residual`` must be ``None``)."""
        if residual:
            raise ValueError("SCAFCOM keeps no residual: its control variate c_k is the feedback")
        return self.codec.compress(delta, None, continuing, seed=seed)

    def decode(self, payload: Mapping[str, np.ndarray]) -> AdapterState:
        """The message ``d_k`` the payload encodes."""
        return self.codec.decode(payload)

