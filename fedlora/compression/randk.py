r"""Random-k sparsification, scaled to be unbiased: the compressor SCALLION's guarantee asks for.

Per tensor of ``n`` entries, keep ``k = max(1, round(density * n))`` positions drawn uniformly without
replacement, and send their values; the receiver puts them back times ``n / k``:

.. math::

    C(v) = \frac{n}{k} \sum_{i \in S} v_i e_i, \qquad E[C(v)] = v, \qquad
    E\|C(v) - v\|^2 = \left(\frac{n}{k} - 1\right) \|v\|^2 ,

so ``omega = n / k - 1`` (about ``1 / density - 1``); SCALLION's control step should then be at most
``1 / (1 + omega) = k / n`` (Huang, Li, Li, ICLR 2024; :mod:`fedlora.core.control`).

The positions are not sent: they follow from a 62-bit seed per message that the sender draws from
the run seed, the round and the client (:func:`fedlora.core.seeds.compression`), and from the tensor's
name, and that travels in the header; the receiver draws the same positions with torch's CPU
generator. Wire format per tensor ``key``: ``key|hdr`` uint8 varints ``[version, numel, k, ndim,
*shape, seed]``, ``key|val`` float32 ``[k]``: ``32 k`` bits plus a few header bytes, so at density
0.05 the payload is about 20x smaller than fp32. An unbiased codec pays for its unbiasedness: the same
bits buy ComPEFT's top-k about six times as many entries, with a far smaller error, but a biased one.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Collection, Mapping

import numpy as np
import torch

from fedlora.compression.compeft import SEP, group_payload
from fedlora.core import varint
from fedlora.core.types import AdapterState, Payload

_VERSION = 1


def positions(numel: int, k: int, seed: int) -> torch.Tensor:
    """The ``k`` sorted positions of a tensor of ``numel`` entries that ``seed`` draws (int64)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(numel, generator=gen)[:k].sort().values


def tensor_seed(seed: int, key: str) -> int:
    """One tensor's 62-bit seed within a message of seed ``seed``."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) & ((1 << 62) - 1)


class RandK:
    """Unbiased random-k: ``k`` uniform positions per tensor, sent exactly, scaled by ``n / k`` on decoding.

    Parameters
    ----------
    density:
        Share of each tensor's entries kept, in ``(0, 1]`` (``1``: the identity).
    """

    error_feedback = False  # unbiased: nothing to carry (SCALLION's control variates track what is sent)

    def __init__(self, *, density: float = 0.05) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"compression.density={density!r} is not a fraction in (0, 1]: the share of entries "
                             "kept per tensor; for 5% write compression.density=0.05")
        self.density = float(density)

    def num_kept(self, numel: int) -> int:
        """``k = max(1, round(density * numel))`` (at most ``numel``; 0 for an empty tensor)."""
        if numel == 0:
            return 0
        return min(numel, max(1, int(math.floor(self.density * numel + 0.5))))

    def compress(self, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None,
                 continuing: Collection[str] | None = None, *, seed: int | None = None,  # noqa: ARG002
                 ) -> tuple[Payload, AdapterState]:
        """Encode ``delta`` with positions drawn from ``seed`` (required: it makes the code reproducible).

        Raises
        ------
        ValueError
            Without a seed, with a residual, for a key containing ``"|"`` or for non-finite values.
        """
        if seed is None:
            raise ValueError("random-k needs a seed per message (the client draws it from the run seed, the round "
                             "and its id)")
        if residual:
            raise ValueError("random-k is unbiased and keeps no residual")
        payload: dict[str, np.ndarray] = {}
        for key in sorted(delta):
            if SEP in key:
                raise ValueError(f"tensor name {key!r} contains {SEP!r}, which the payload reserves")
            v = delta[key].detach().to("cpu", torch.float32).reshape(-1)
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"random-k: non-finite values in the update of {key!r}")
            numel, k = v.numel(), self.num_kept(v.numel())
            own = tensor_seed(seed, key)
            shape = [int(d) for d in delta[key].shape]
            hdr = varint.encode([_VERSION, numel, k, len(shape), *shape, own])
            payload[f"{key}{SEP}hdr"] = np.frombuffer(hdr, dtype=np.uint8).copy()
            payload[f"{key}{SEP}val"] = v[positions(numel, k, own)].numpy().astype(np.float32, copy=True)
        return payload, {}

    def decode(self, payload: Mapping[str, np.ndarray]) -> AdapterState:
        """``C(v)``: the kept values times ``numel / k`` at their positions, zeros elsewhere (float32)."""
        groups = group_payload(payload)
        out: AdapterState = {}
        for key in sorted(groups):
            hdr = np.ascontiguousarray(groups[key]["hdr"], dtype=np.uint8).tobytes()
            (version, numel, k, ndim), at = varint.decode(hdr, 4)
            if version != _VERSION:
                raise ValueError(f"random-k payload version {version} for {key!r}; this decoder reads {_VERSION}")
            values = varint.decode(hdr, ndim + 1, at)[0]
            shape, own = tuple(values[:ndim]), values[ndim]
            kept = torch.from_numpy(np.asarray(groups[key]["val"], dtype=np.float32).copy())
            if kept.numel() != k:
                raise ValueError(f"corrupt random-k payload: {kept.numel()} values for {k} positions of {key!r}")
            flat = torch.zeros(numel, dtype=torch.float32)
            if k:
                flat[positions(numel, k, own)] = kept * (numel / k)
            out[key] = flat.reshape(shape)
        return out
