r"""ComPEFT uplink compression: top-k sparsification + ternary quantisation, Golomb-Rice coded.

Yadav, P., Choshen, L., Raffel, C., Bansal, M. "ComPEFT: Compression for Communicating Parameter
Efficient Updates via Sparsification and Quantization." arXiv:2311.13171 (2023).

Update rule (algorithms.md §5, with the FL design recommended there). A client compresses its
round delta ``δ = θ_end - θ_start`` per tensor with error feedback ``e``:

.. math::

    v = \delta + e, \qquad
    \hat v = \sigma \cdot \operatorname{sign}(v) \odot \mathbb{1}[i \in \operatorname{top}_k(|v|)],
    \qquad e \leftarrow v - \hat v ,

where ``k = max(1, round(density * numel))`` (``density`` is a **fraction**. ComPEFT's ``--k`` is an
integer percent and values above 1 are divided by 100, so its ``k=1`` is read as the fraction 1
and ``kthvalue(0)`` raises. Here any density above 1 raises, naming the field; a regression test
pins it) and one fp32 scale per tensor:

* ``scale="std"``: ``σ = alpha * std(v)`` over the whole tensor before sparsification (ComPEFT's
  rule, applied per tensor; population std, ``ddof=0``, where ComPEFT's ``torch.std`` is the
  sample std, larger by ``sqrt(n/(n-1))``: 1.0007 at 768 entries, 1.118 for a 5-entry bias);
* ``scale="mean_abs"``: ``σ = alpha * mean(|v|)`` over the kept entries, the L2-optimal scale for
  a fixed support at ``alpha = 1`` (not the *signed* mean of STC mode ``-2`` in ComPEFT's code,
  which is ≈ 0);
* ``scale="none"``: the exact fp32 values on the support (no quantisation); with ``density=1``
  this is the identity, bit for bit.

Ternary modes drop exact zeros from the support (a sign bit cannot encode 0), so fewer than ``k``
entries are kept only when ``v`` has fewer than ``k`` non-zeros. Ties in ``|v|`` at the threshold
are broken towards the lower flat index, so exactly ``k`` entries are kept, deterministically.

Deviations from the official code (prateeky2806/ComPEFT at d80ba58, ``src/qlora/ties_utils.py``
``get_compressed_lora_weights``; ``bert_eval.py`` and ``t5_eval.py`` repeat its logic):

* **Per tensor, not one vector.** The official code sorts the adapter's tensors by name, flattens
  them into one vector, and takes one top-k and one std over it. Here each tensor has its own
  top-k and scale. The tensors of one upload (LoRA ``A`` and ``B``, the classifier head) differ in
  scale: one threshold would spend the budget on the largest of them, and one scale would size
  every step by them. Per tensor, a tensor's code does not depend on the rest of the upload, so the
  same rule holds at every rank and for strategies that send only ``B`` (FFA-LoRA) or keep a
  residual for the head only (FLoRA). The cost is one header and 32 bits of scale per tensor. Kept.
* **Round deltas with error feedback, not the finished weights.** The official code compresses the
  LoRA weights themselves (``θ_init = 0``) once, after fine-tuning. Here each round's delta plus
  the residual is compressed. Kept: federated rounds need it.
* **Population std.** The official ``tv.std()`` is torch's sample std (``N-1``); here ``ddof=0``,
  smaller by ``sqrt(n/(n-1))`` (above). Kept for now: it changes only tensors of a few entries, and
  the golden files pin today's numbers; a scale tuned on validation data absorbs it.
* **Exactly k entries.** The official mask ``|τ| >= kthvalue(|τ|, d - int(d·K))`` keeps
  ``int(d·K) + 1`` entries (one more than its own comment says), plus every tie at the threshold;
  when the mask covers everything (all ties, or at most ``int(d·K)`` non-zeros) its assertion takes
  ``max()`` of an empty tensor and raises. Here exactly ``k`` are kept: the same number or one
  fewer. Kept, so that ``density`` is the share actually sent and the size does not depend on ties.
* **k as a fraction** (above). The official ``k = 100`` means no compression; here ``density = 1``.
* **alpha is fixed.** The paper tunes alpha (``--replace_factor``) and the density on validation
  data; its code has no tuning loop. ``alpha = 1`` is the default here.

Wire format (:meth:`ComPEFT.compress` returns it; ``encoded_bits`` measures it). Per tensor ``key``:

* ``key|hdr`` uint8: ``[version, mode, numel, nnz, b, unary_bits, ndim, *shape]`` as unsigned
  varints (:mod:`fedlora.core.varint`; about 12 bytes for a 384 x 8 factor where int64 took 80);
* ``key|pos_q``, ``key|pos_r`` uint8: the sorted positions as gaps ``g_i = p_i - p_{i-1} - 1``
  (``p_{-1} = -1``), Golomb-Rice coded with parameter ``b``: the unary quotients ``g >> b``
  (``q`` ones and a terminating zero each) and the ``b``-bit remainders (MSB first) in two packed
  bit streams — the same code lengths as interleaved Rice codes, but decodable with vectorised
  numpy. Empty when every entry is kept (positions implicit);
* ``key|sign`` uint8: one bit per kept entry (1 = negative), and ``key|scale`` float32 ``[σ]``; or,
  with ``scale="none"``, ``key|val`` float32: the kept values.

``b`` is the optimum of algorithms.md §5 for the geometric gaps of a kept share ``p = nnz/numel``:
``b* = 1 + floor(log2(log(φ - 1) / log(1 - p)))`` (``φ`` the golden ratio), clamped at 0; at
``p = 0.1`` it gives ``b = 3`` and ≈ 5.76 bits per kept entry with the sign, ≈ 0.58 bits/param.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import ClassVar

import numpy as np
import torch

from fedlora.core import varint
from fedlora.core.types import AdapterState, Payload

SEP = "|"
_VERSION = 2  # 2: the header as varints (1: int64)
_MODES = ("std", "mean_abs", "none")
_PHI = (1.0 + math.sqrt(5.0)) / 2.0


def rice_parameter(kept_share: float) -> int:
    """Return the optimal Rice parameter ``b`` for gaps between positions kept with probability ``p``.

    ``b* = 1 + floor(log2(log(φ - 1) / log(1 - p)))`` (Gallager and van Voorhis' optimum for a
    geometric source, algorithms.md §5), clamped to ``[0, 62]``.
    """
    if kept_share >= 1.0:
        return 0
    if kept_share <= 0.0:
        return 62
    ratio = math.log(_PHI - 1.0) / math.log1p(-kept_share)
    return int(min(62, max(0, 1 + math.floor(math.log2(ratio)))))


def encoded_bits(payload: Mapping[str, np.ndarray]) -> int:
    """Return the real size of an encoded payload in bits: ``8 * sum(nbytes)`` of its arrays."""
    return 8 * sum(int(np.asarray(arr).nbytes) for arr in payload.values())


def _top_k_positions(mag: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` largest ``mag``; ties at the threshold go to lower indices."""
    numel = mag.size
    if k >= numel:
        return np.arange(numel, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(mag, numel - k)[numel - k]  # the k-th largest |v|
    mask = mag > threshold
    need = k - int(np.count_nonzero(mask))
    if need > 0:
        mask[np.flatnonzero(mag == threshold)[:need]] = True
    return np.flatnonzero(mask).astype(np.int64, copy=False)


def _rice_encode(gaps: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Golomb-Rice code non-negative int64 ``gaps``.

    Returns the packed unary quotients, the packed ``b``-bit remainders and the unary bit count.
    """
    q = gaps >> b  # (k,)
    ends = np.cumsum(q + 1) - 1  # index of each code's terminating 0
    unary_bits = int(ends[-1]) + 1 if ends.size else 0
    bits = np.ones(unary_bits, dtype=np.uint8)
    bits[ends] = 0
    unary = np.packbits(bits)
    if b == 0 or gaps.size == 0:
        return unary, np.zeros(0, dtype=np.uint8), unary_bits
    rem = gaps & ((1 << b) - 1)  # (k,)
    shifts = np.arange(b - 1, -1, -1, dtype=np.int64)  # MSB first
    rem_bits = ((rem[:, None] >> shifts[None, :]) & 1).astype(np.uint8)  # (k, b)
    return unary, np.packbits(rem_bits.ravel()), unary_bits


def _rice_decode(unary: np.ndarray, rem: np.ndarray, unary_bits: int, count: int, b: int) -> np.ndarray:
    """Inverse of :func:`_rice_encode`: the ``count`` gaps (int64)."""
    bits = np.unpackbits(unary, count=unary_bits)
    ends = np.flatnonzero(bits == 0)  # (count,)
    if ends.size != count:
        raise ValueError(f"corrupt ComPEFT payload: {ends.size} unary codes for {count} positions")
    q = np.diff(ends, prepend=-1) - 1
    gaps = q.astype(np.int64) << b
    if b > 0:
        rem_bits = np.unpackbits(rem, count=count * b).reshape(count, b).astype(np.int64)  # (count, b)
        gaps |= rem_bits @ (np.int64(1) << np.arange(b - 1, -1, -1, dtype=np.int64))
    return gaps


def group_payload(payload: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """A payload's arrays by tensor: ``{"<key>|<part>": array}`` as ``{key: {part: array}}``."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in payload.items():
        key, _, part = name.rpartition(SEP)
        groups.setdefault(key, {})[part] = np.asarray(arr)
    return groups


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)


class ComPEFT:
    """ComPEFT compression of client uploads (Yadav et al. 2023), with error feedback.

    Parameters
    ----------
    density:
        Share of entries kept per tensor, a fraction in ``(0, 1]`` (``0.1`` keeps 10%; ``1``
        keeps everything). ComPEFT's grid in percent {5, 10, 20, 30, 50} is {0.05, ..., 0.5} here.
    scale:
        ``"std"`` (ComPEFT: ``alpha * std(v)``), ``"mean_abs"`` (L2-optimal for the support at
        ``alpha = 1``), or ``"none"`` (exact values on the support, no quantisation).
    alpha:
        Multiplier of the ternary scale (ComPEFT's ``replace_factor``), finite and > 0; must stay
        1.0 with ``scale="none"``.
    error_feedback:
        Carry ``v - decoded(v)`` to the next round (nothing is lost over time) for every tensor
        that continues from the global adapter: ``"auto"`` (the config's default) or ``True``;
        ``False`` drops it. The LoRA factors of a strategy that starts fresh factors every round
        (FLoRA) never carry a residual: last round's would be added to a new random ``A`` and a
        zero ``B`` it has nothing to do with (the caller passes which tensors continue).
    """

    # what it cannot run under, by privacy mode (dp_sgd, dp_fedavg, secure), with the reason and the fix; the
    # configuration check reads it (fedlora.config.validate): DP-SGD's outputs compressed are post-processing, and
    # DP-FedAvg's server clips the decoded update
    privacy_refusals: ClassVar[Mapping[str, str]] = {
        "secure": "under secure aggregation each update is masked into a dense vector of integers, so ComPEFT's "
                  "sparsity saves nothing and its decoder would need each client's payload; use compression=none "
                  "with privacy.secure=true"}

    def __init__(
        self, *, density: float = 0.1, scale: str = "std", alpha: float = 1.0, error_feedback: bool | str = "auto",
    ) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(
                f"compression.density={density!r} is not a fraction in (0, 1]: it is the share of entries "
                "kept per tensor (0.1 keeps 10%, 1 keeps everything), not a percentage; for 20% write "
                "compression.density=0.2"
            )
        if scale not in _MODES:
            raise ValueError(f"compression.scale={scale!r} is not one of {_MODES}; use 'std' (ComPEFT)")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"compression.alpha={alpha!r} must be a finite number > 0; use 1.0")
        if scale == "none" and alpha != 1.0:
            raise ValueError(
                f"compression.alpha={alpha!r} has no effect with compression.scale='none' (exact values); "
                "remove it or use scale='std'"
            )
        if error_feedback != "auto" and not isinstance(error_feedback, bool):
            raise ValueError(f"compression.error_feedback={error_feedback!r} must be auto (the default: on for "
                             "every tensor that continues from the global adapter), true or false")
        self.density = float(density)
        self.scale = scale
        self.alpha = float(alpha)
        self.error_feedback = error_feedback is not False

    def num_kept(self, numel: int) -> int:
        """Return ``k = max(1, round(density * numel))`` (at most ``numel``; 0 for an empty tensor)."""
        if numel == 0:
            return 0
        return min(numel, max(1, int(math.floor(self.density * numel + 0.5))))

    # -- encoding -------------------------------------------------------------------------------
    def _encode_one(self, v: np.ndarray, shape: tuple[int, ...]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Encode one flat float32 tensor ``v``; return its payload arrays and the decoded values."""
        numel = v.size
        mode = _MODES.index(self.scale)
        mag = np.abs(v)
        pos = _top_k_positions(mag, self.num_kept(numel))  # sorted
        if self.scale != "none":
            pos = pos[v[pos] != 0]  # a sign bit cannot encode 0: never spend bits on zeros
        nnz = int(pos.size)
        kept = v[pos]
        decoded = np.zeros(numel, dtype=np.float32)
        arrays: dict[str, np.ndarray] = {}
        if self.scale == "none":
            arrays["val"] = kept.astype(np.float32, copy=True)
            decoded[pos] = kept
        else:
            if self.scale == "std":
                sigma = self.alpha * float(np.std(v, dtype=np.float64)) if numel else 0.0
            else:
                sigma = self.alpha * float(np.mean(mag[pos], dtype=np.float64)) if nnz else 0.0
            sigma32 = np.float32(sigma)
            negative = kept < 0
            arrays["sign"] = np.packbits(negative)
            arrays["scale"] = np.array([sigma32], dtype=np.float32)
            decoded[pos] = np.where(negative, -sigma32, sigma32)
        if nnz == numel:  # every entry kept: positions are implicit
            b, unary, rem, unary_bits = 0, np.zeros(0, np.uint8), np.zeros(0, np.uint8), 0
        else:
            b = rice_parameter(nnz / numel)
            gaps = np.diff(pos, prepend=-1) - 1  # (nnz,) >= 0
            unary, rem, unary_bits = _rice_encode(gaps, b)
        arrays["pos_q"], arrays["pos_r"] = unary, rem
        fields = [_VERSION, mode, numel, nnz, b, unary_bits, len(shape), *shape]
        arrays["hdr"] = np.frombuffer(varint.encode(fields), dtype=np.uint8).copy()
        return arrays, decoded

    def carried(self, keys: Collection[str], continuing: Collection[str] | None = None) -> set[str]:
        """The tensors of ``keys`` whose residual is kept: the continuing ones (all by default), with
        error feedback."""
        if not self.error_feedback:
            return set()
        return set(keys) if continuing is None else {key for key in keys if key in continuing}

    def compress(
        self, delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None,
        continuing: Collection[str] | None = None, *, seed: int | None = None,  # noqa: ARG002 - deterministic
    ) -> tuple[Payload, AdapterState]:
        """Encode ``delta + residual``; return the payload and the new residual.

        Parameters
        ----------
        delta:
            The round's update per tensor (trained minus start).
        residual:
            The error-feedback memory from the previous round (``None``: zeros). Must have the keys
            of ``delta`` that carry a residual (:meth:`carried`), with their shapes.
        continuing:
            The tensors that continue from the global adapter (all but fresh LoRA factors; ``None``:
            all of them).

        Returns
        -------
        payload:
            ``{f"{key}|{part}": numpy array}`` (see the module docstring).
        residual:
            ``v - decoded(v)`` in float32 for every tensor that carries a residual; empty when
            ``error_feedback`` is off (or when no tensor continues).

        Raises
        ------
        ValueError
            On a key containing ``"|"``, a residual that does not match ``delta``, or non-finite values.
        """
        carried = self.carried(delta, continuing)
        if residual is not None and set(residual) != carried:
            raise ValueError(
                f"ComPEFT residual keys {sorted(residual)} do not match the update keys that carry one "
                f"{sorted(carried)}"
            )
        payload: dict[str, np.ndarray] = {}
        new_residual: AdapterState = {}
        for key in sorted(delta):
            if SEP in key:
                raise ValueError(f"tensor name {key!r} contains {SEP!r}, which the ComPEFT payload reserves")
            tensor = delta[key]
            shape = tuple(int(d) for d in tensor.shape)
            v = _to_numpy(tensor)
            if residual is not None and key in carried:
                if tuple(residual[key].shape) != shape:
                    raise ValueError(
                        f"ComPEFT residual for {key!r} has shape {tuple(residual[key].shape)}, update {shape}"
                    )
                v = v + _to_numpy(residual[key])  # v = delta + e
            if not np.all(np.isfinite(v)):
                raise ValueError(f"ComPEFT: non-finite values in the update of {key!r}")
            arrays, decoded = self._encode_one(v, shape)
            for part, arr in arrays.items():
                payload[f"{key}{SEP}{part}"] = arr
            if key in carried:
                res = v - decoded
                new_residual[key] = torch.from_numpy(res.astype(np.float32, copy=False).reshape(shape))
        return payload, new_residual

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, payload: Mapping[str, np.ndarray]) -> AdapterState:
        """Exact inverse of the encoding: float32 tensors with their original shapes."""
        groups = group_payload(payload)
        out: AdapterState = {}
        for key in sorted(groups):
            parts = groups[key]
            hdr = np.ascontiguousarray(parts["hdr"], dtype=np.uint8).tobytes()
            (version, mode, numel, nnz, b, unary_bits, ndim), at = varint.decode(hdr, 7)
            if version != _VERSION:
                raise ValueError(
                    f"ComPEFT payload version {version} for {key!r}; this decoder reads {_VERSION}"
                )
            shape = tuple(varint.decode(hdr, ndim, at)[0])
            if nnz == numel:
                pos = np.arange(numel, dtype=np.int64)
            else:
                gaps = _rice_decode(parts["pos_q"], parts["pos_r"], unary_bits, nnz, b)
                pos = np.cumsum(gaps + 1) - 1
            values = np.zeros(numel, dtype=np.float32)
            if _MODES[mode] == "none":
                values[pos] = parts["val"].astype(np.float32, copy=False)
            else:
                sigma = np.float32(parts["scale"].reshape(-1)[0])
                negative = np.unpackbits(parts["sign"], count=nnz).astype(bool)
                values[pos] = np.where(negative, -sigma, sigma)
            out[key] = torch.from_numpy(values.reshape(shape))
        return out
