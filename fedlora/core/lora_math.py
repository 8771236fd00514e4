"""LoRA factor algebra on adapter states (torch only, no peft).

Shapes follow peft and ``nn.Linear``: ``A`` is ``(r, n)``, ``B`` is ``(m, r)``, the dense update
``s * B @ A`` is ``(m, n)``, oriented like ``nn.Linear.weight``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from fedlora.core import seeds
from fedlora.core.types import AdapterState, BaseMerge, ClientPlan, LoraPair, Tensor

# The only place that spells peft's key names of the two factors.
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_MERGE_SEP = "|"  # merge tensor names: "<index>|<module>|A" and "...|B"


def lora_a_key(module: str) -> str:
    """Return the state key of module ``module``'s ``A`` factor."""
    return module + _A_SUFFIX


def lora_b_key(module: str) -> str:
    """Return the state key of module ``module``'s ``B`` factor."""
    return module + _B_SUFFIX


def is_lora_key(key: str) -> bool:
    """Return whether ``key`` names a LoRA factor (matched on the name, never on the shape)."""
    return key.endswith(_A_SUFFIX) or key.endswith(_B_SUFFIX)


def is_lora_a_key(key: str) -> bool:
    """Return whether ``key`` names an ``A`` factor."""
    return key.endswith(_A_SUFFIX)


def is_lora_b_key(key: str) -> bool:
    """Return whether ``key`` names a ``B`` factor."""
    return key.endswith(_B_SUFFIX)


def is_personal_key(key: str) -> bool:
    """Return whether tensor ``key`` stays on the client under a personal plan (``ClientPlan.personal``):
    every ``B`` factor and every non-LoRA trainable (the head); only ``A`` is shared."""
    return not key.endswith(_A_SUFFIX)


def lora_modules(state: Mapping[str, Tensor]) -> list[str]:
    """Return the sorted names of the adapted modules in ``state`` (those with an ``A`` or ``B``)."""
    names = {k[: -len(_A_SUFFIX)] for k in state if k.endswith(_A_SUFFIX)}
    names |= {k[: -len(_B_SUFFIX)] for k in state if k.endswith(_B_SUFFIX)}
    return sorted(names)


def split_state(state: Mapping[str, Tensor]) -> tuple[dict[str, LoraPair], dict[str, Tensor]]:
    """Split an adapter state into ``{module: LoraPair(A, B)}`` and the other trainables.

    Raises
    ------
    KeyError
        If a module has an ``A`` without a ``B`` or the reverse.
    """
    pairs = {m: LoraPair(state[lora_a_key(m)], state[lora_b_key(m)]) for m in lora_modules(state)}
    others = {k: v for k, v in state.items() if not is_lora_key(k)}
    return pairs, others


def join_state(pairs: Mapping[str, tuple[Tensor, Tensor]], others: Mapping[str, Tensor]) -> AdapterState:
    """Inverse of :func:`split_state`."""
    out: AdapterState = {}
    for module, (a, b) in pairs.items():
        out[lora_a_key(module)] = a
        out[lora_b_key(module)] = b
    out.update(others)
    return out


def rank_of(state: Mapping[str, Tensor]) -> int:
    """Return the LoRA rank of ``state`` (the same for every module, else ``ValueError``)."""
    ranks = {state[lora_a_key(m)].shape[0] for m in lora_modules(state) if lora_a_key(m) in state}
    ranks |= {state[lora_b_key(m)].shape[1] for m in lora_modules(state) if lora_b_key(m) in state}
    if len(ranks) != 1:
        raise ValueError(f"adapter state has ranks {sorted(ranks)}; expected exactly one")
    return ranks.pop()


def pad_pair(a: Tensor, b: Tensor, rank: int) -> LoraPair:
    """Zero-pad ``A`` (rows) and ``B`` (columns) to ``rank``; ``B @ A`` is unchanged exactly."""
    r = a.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    a_pad = torch.zeros((rank, a.shape[1]), dtype=a.dtype)  # (rank, n)
    b_pad = torch.zeros((b.shape[0], rank), dtype=b.dtype)  # (m, rank)
    a_pad[:r] = a
    b_pad[:, :r] = b
    return LoraPair(a_pad, b_pad)


def truncate_pair(a: Tensor, b: Tensor, rank: int) -> LoraPair:
    """Keep the first ``rank`` slots: ``A[:rank, :]`` and ``B[:, :rank]`` (copies)."""
    if rank > a.shape[0]:
        raise ValueError(f"cannot truncate rank {a.shape[0]} up to {rank}")
    return LoraPair(a[:rank].clone(), b[:, :rank].clone())


def resize_state(state: Mapping[str, Tensor], rank: int) -> AdapterState:
    """Pad or truncate every LoRA pair of ``state`` to ``rank``; other tensors are copied."""
    pairs, others = split_state(state)
    out_pairs: dict[str, LoraPair] = {}
    for module, (a, b) in pairs.items():
        if a.shape[0] <= rank:
            out_pairs[module] = pad_pair(a, b, rank)
        else:
            out_pairs[module] = truncate_pair(a, b, rank)
    return join_state(out_pairs, {k: v.clone() for k, v in others.items()})


def pad_key(key: str, value: Tensor, shape: tuple[int, ...], what: str = "the target") -> Tensor:
    """Tensor ``key`` zero-padded to ``shape`` in its rank slots (rows of an ``A``, the last dimension of a
    ``B``); itself when it has that shape already.

    Raises
    ------
    ValueError
        For a tensor that is not a LoRA factor and has another shape (``what`` names the other side).
    """
    if tuple(value.shape) == shape:
        return value
    out = torch.zeros(shape, dtype=value.dtype)
    if is_lora_a_key(key):
        out[: value.shape[0]] = value
    elif is_lora_b_key(key):
        out[..., : value.shape[-1]] = value
    else:
        raise ValueError(f"{key!r} has shape {tuple(value.shape)}, {what} {shape}")
    return out


def truncate_keys(state: Mapping[str, Tensor], rank: int) -> AdapterState:
    """Every LoRA factor of ``state`` cut to its first ``rank`` slots, key by key (an ``A`` or a ``B`` alone
    is fine: a residual or an upload need not hold both); factors already at or below ``rank`` and other
    tensors are copied as they are."""
    out = {}
    for key, value in state.items():
        if is_lora_a_key(key):
            out[key] = value[:rank].clone()
        elif is_lora_b_key(key):
            out[key] = value[:, :rank].clone()
        else:
            out[key] = value.clone()
    return out


def pruned_rank(rank: int, gamma: float, min_rank: int) -> int:
    """HetLoRA's next rank ``max(min_rank, floor(gamma * rank))``, never above ``rank``.

    ``floor`` is taken with a small tolerance, so that ``gamma * rank`` a rounding error below an integer
    (``0.7 * 10 = 6.999...``) does not lose a slot.
    """
    return min(rank, max(min_rank, math.floor(gamma * rank + 1e-9)))


def tail_norm(pairs: Mapping[str, tuple[Tensor, Tensor]], keep: int) -> Tensor:
    """``sum_modules ||B[:, keep:] A[keep:, :]||_F``, differentiable (HetLoRA's rank regulariser).

    Computed from the tail's ``(w, w)`` Gram matrices (``w = r - keep``, a slot or a few), never the
    ``(m, n)`` product: ``||B_t A_t||_F^2 = sum((B_t^T B_t) * (A_t A_t^T))``. The square root's gradient at
    a zero tail (``B = 0``: round 1) is taken as zero, not ``nan``.
    """
    total: Tensor | None = None
    for a, b in pairs.values():
        a_t, b_t = a[keep:], b[:, keep:]  # (w, n), (m, w)
        sq = ((b_t.T @ b_t) * (a_t @ a_t.T)).sum()
        positive = sq > 0
        norm = torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))
        total = norm if total is None else total + norm
    if total is None:
        return torch.zeros(())
    return total


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """Return ``p_k = n_k / sum_j n_j`` over the participants (renormalised each round).

    Raises
    ------
    ValueError
        If a count is negative or all are zero.
    """
    if any(n < 0 for n in num_examples):
        raise ValueError(f"negative example count in {list(num_examples)}")
    total = sum(num_examples)
    if total == 0:
        raise ValueError("every participant reported 0 examples; nothing to weight by")
    return [n / total for n in num_examples]


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Return ``sum_k w_k * t_k`` accumulated in float32 (or float64 if the inputs are)."""
    acc_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    acc = torch.zeros(tensors[0].shape, dtype=acc_dtype)
    for t, w in zip(tensors, weights, strict=True):
        acc += w * t.to(acc_dtype)
    return acc.to(tensors[0].dtype)


def average_others(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> AdapterState:
    """Weighted average of every non-LoRA tensor (the head), key by key."""
    _, first = split_state(states[0])
    return {k: weighted_sum([s[k] for s in states], weights) for k in sorted(first)}


def stack_pairs(pairs: Sequence[tuple[Tensor, Tensor]], coefficients: Sequence[float]) -> LoraPair:
    """Stack factors so that ``B_st @ A_st == sum_k c_k * B_k @ A_k`` exactly (FLoRA).

    ``pairs`` are ``(A_k, B_k)``. ``A_st = [c_1 A_1; ...; c_K A_K]`` (rows) and
    ``B_st = [B_1, ..., B_K]`` (columns); the coefficient goes on ``A`` only, exactly once. Ranks
    may differ.
    """
    a_st = torch.cat([c * a for (a, _), c in zip(pairs, coefficients, strict=True)], dim=0)
    b_st = torch.cat([b for _, b in pairs], dim=1)
    return LoraPair(a_st, b_st)  # (sum r, n), (m, sum r)


def merge_delta(merge: BaseMerge, module: str) -> Tensor:
    """Return the dense ``(m, n)`` update of one module of a factored merge."""
    a, b = merge[module]
    return b @ a


def concat_merges(merges: Sequence[BaseMerge]) -> BaseMerge:
    """Concatenate factored merges so the product is their sum (cumulative base delta)."""
    modules = sorted({m for merge in merges for m in merge})
    out: BaseMerge = {}
    for module in modules:
        parts = [merge[module] for merge in merges if module in merge]
        out[module] = LoraPair(torch.cat([a for a, _ in parts], dim=0), torch.cat([b for _, b in parts], dim=1))
    return out


def merges_to_tensors(merges: Iterable[tuple[int, BaseMerge]]) -> dict[str, Tensor]:
    """Flatten indexed base merges to named tensors: ``"<index>|<module>|A"`` and ``"...|B"``.

    The one serialisation of merges: the wire sends it (the merges a client has not applied yet)
    and the checkpoint writes it (one file per merge).
    """
    out: dict[str, Tensor] = {}
    for index, merge in merges:
        for module, (a, b) in merge.items():
            out[_MERGE_SEP.join((str(index), module, "A"))] = a  # (R, n)
            out[_MERGE_SEP.join((str(index), module, "B"))] = b  # (m, R)
    return out


def tensors_to_merges(tensors: Mapping[str, Tensor]) -> list[tuple[int, BaseMerge]]:
    """Inverse of :func:`merges_to_tensors`, sorted by index."""
    parts: dict[int, dict[str, dict[str, Tensor]]] = {}
    for name, tensor in tensors.items():
        index, module, factor = name.split(_MERGE_SEP)
        parts.setdefault(int(index), {}).setdefault(module, {})[factor] = tensor
    return [(i, {m: LoraPair(f["A"], f["B"]) for m, f in sorted(mods.items())}) for i, mods in sorted(parts.items())]


def fold_merges(adapter: Mapping[str, Tensor], scaling: float, merges: Sequence[BaseMerge]) -> tuple[AdapterState, int]:
    """Fold base merges into one adapter at scaling 1, so that it loads on the pristine base.

    With merges ``B_cum @ A_cum`` the folded factors are ``A = [A_g; A_cum]`` and
    ``B = [s B_g, B_cum]``, whose product is exactly ``s B_g A_g + B_cum A_cum``. Returns the
    folded state and its rank (save it with ``lora_alpha = rank``: scaling 1). Without merges the
    adapter is returned as it is, with its own rank (save it with its own alpha).
    """
    if not merges:
        return dict(adapter), rank_of(adapter)
    cumulative = concat_merges(merges)
    pairs, others = split_state(adapter)
    folded = {module: LoraPair(torch.cat([a, cumulative[module].a], dim=0),
                               torch.cat([scaling * b, cumulative[module].b], dim=1))
              for module, (a, b) in pairs.items()}
    state = join_state(folded, others)
    return state, rank_of(state)


def fold_for_peft(adapter: Mapping[str, Tensor], scaling: float, merges: Sequence[BaseMerge],
                  alpha: float) -> tuple[AdapterState, int, float]:
    """:func:`fold_merges`, with the ``lora_alpha`` to save the result with: its rank when merges were folded
    in (scaling 1), else ``alpha``, the adapter's own. Returns ``(state, rank, lora_alpha)``."""
    folded, rank = fold_merges(adapter, scaling, merges)
    return folded, rank, float(rank) if merges else alpha


def continues(plan: ClientPlan, key: str) -> bool:
    """Whether tensor ``key`` of a client's adapter continues from the global one under ``plan``.

    Every tensor does, except the LoRA factors of a fresh adapter (``plan.adapter is None``: new
    factors every round): a compression residual can be carried only for continuing tensors.
    """
    return plan.adapter is not None or not is_lora_key(key)


def plan_start(plan: ClientPlan, modules: Mapping[str, tuple[int, int]]) -> AdapterState:
    """The adapter a client starts its round from, at ``plan.rank`` (copies, never the plan's tensors).

    ``plan.adapter is None`` is a fresh adapter: ``A`` drawn from ``plan.init_seed``, ``B = 0`` and
    the plan's head. Otherwise the plan's adapter, with every ``A`` it lacks (kept off the wire,
    ``send_lora_a=False``) drawn from ``plan.init_seed``: the sender and the receiver of a plan
    build the same start, bit for bit.
    """
    if plan.adapter is None:
        return fresh_state(modules, plan.rank, plan.init_seed, plan.head)
    start = {k: v.clone() for k, v in plan.adapter.items()}
    for module, (_, n) in modules.items():
        if lora_a_key(module) not in start:
            start[lora_a_key(module)] = init_lora_a(plan.init_seed, module, plan.rank, n)  # (r, n)
    return start


def init_lora_a(seed: int, module: str, rank: int, in_features: int) -> Tensor:
    """Draw ``A`` of shape ``(rank, in_features)`` deterministically from ``seed`` and ``module``.

    Each row has its own generator, so the first ``r`` rows are bit-identical whatever ``rank``
    is asked for: rank ``r`` uses the first ``r`` rows of one shared ``A`` (FFA-LoRA with mixed
    ranks). Values are uniform in ``[-1/sqrt(n), 1/sqrt(n)]``, the bound of peft's default
    Kaiming-uniform (``a = sqrt(5)``) initialisation.
    """
    bound = 1.0 / math.sqrt(in_features)
    rows = []
    for row in range(rank):
        gen = torch.Generator().manual_seed(seeds.lora_a_row(seed, module, row))
        rows.append(torch.rand(in_features, generator=gen, dtype=torch.float32))
    a = torch.stack(rows) if rows else torch.zeros((0, in_features))
    return (a * 2.0 - 1.0) * bound  # (rank, n)


def fresh_state(
    modules: Mapping[str, tuple[int, int]], rank: int, seed: int, head: Mapping[str, Tensor]
) -> AdapterState:
    """Return a fresh adapter at ``rank``: ``A`` from :func:`init_lora_a`, ``B = 0``, ``head``."""
    pairs = {
        module: LoraPair(init_lora_a(seed, module, rank, n), torch.zeros((m, rank)))
        for module, (m, n) in modules.items()
    }
    return join_state(pairs, {k: v.clone() for k, v in head.items()})


def state_num_params(state: Mapping[str, Tensor]) -> int:
    """Return the number of scalars in ``state``."""
    return sum(t.numel() for t in state.values())


def slot_update_energy(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> list[float]:
    """Energy of the change of each rank slot's term, summed over modules (float64, never dense).

    Slot ``i`` of an adapter contributes the rank-1 term ``B[:, i] A[i]``; its change from ``old`` to
    ``new`` has ``||b' a'^T - b a^T||_F^2 = |b'|^2 |a'|^2 + |b|^2 |a|^2 - 2 (b'.b)(a'.a)``. Returns one
    value per slot of ``new`` (``old`` is zero-padded to its rank). With mixed ranks and zero-padding,
    the update's energy can concentrate in the first slots, the ones every client trains: a
    rank-collapse diagnostic.
    """
    old_pairs, _ = split_state(old)
    new_pairs, _ = split_state(new)
    energy: Tensor | None = None
    for module, (a_new, b_new) in new_pairs.items():
        r = a_new.shape[0]
        a_old, b_old = pad_pair(*old_pairs[module], r) if module in old_pairs else (
            torch.zeros_like(a_new), torch.zeros_like(b_new))
        a1, b1, a0, b0 = a_new.double(), b_new.double(), a_old.double(), b_old.double()
        na1, nb1 = a1.pow(2).sum(dim=1), b1.pow(2).sum(dim=0)  # (r,)
        na0, nb0 = a0.pow(2).sum(dim=1), b0.pow(2).sum(dim=0)
        cross = (a1 * a0).sum(dim=1) * (b1 * b0).sum(dim=0)
        term = (nb1 * na1 + nb0 * na0 - 2 * cross).clamp_min(0.0)
        energy = term if energy is None else energy + term
    return [] if energy is None else [float(e) for e in energy]


def row_space_core(a: Tensor) -> Tensor:
    """Return the ``R`` factor of the thin QR ``A^T = Q R`` (float64, shape ``(min(n, R), R)``).

    Because ``Q`` has orthonormal columns, ``||X @ A||_F = ||X @ R^T||_F`` for every ``X`` of
    shape ``(m, R)``, and for the first ``k`` rows of ``A``, ``||X @ A[:k]||_F = ||X @ R[:, :k]^T||_F``
    (``A[:k]^T = Q R[:, :k]``). One QR of the ``A`` side therefore serves every norm of products
    that share it (:func:`fro_through_core`): the aggregation diagnostics compute several such norms
    per module (ideal update, gap before and after a correction).
    """
    a64 = a.double()  # (R, n)
    if a64.numel() == 0:
        return torch.zeros((0, a64.shape[0]), dtype=torch.float64)
    core: Tensor = torch.linalg.qr(a64.T, mode="r").R  # (min(n, R), R)
    return core


def fro_through_core(b: Tensor, core: Tensor) -> float:
    """Return ``||B @ A||_F`` from ``core = row_space_core(A)`` (or a column block of it): ``||B core^T||_F``."""
    if b.numel() == 0 or core.numel() == 0:
        return 0.0
    return float(torch.linalg.matrix_norm(b.double() @ core.T))  # (m, q)


def ideal_and_gap_norms(ideal_pair: LoraPair, a: Tensor, bs: Sequence[Tensor]) -> tuple[float, list[float]]:
    """Return ``||B_id A_id||_F`` and ``[||B_id A_id - B A||_F for B in bs]``, never forming ``m x n``.

    ``B_id A_id`` is typically a stacked ideal update (:func:`stack_pairs`) and each ``B A`` an
    aggregate sharing the ``A`` side. One QR of ``[A_id; A]`` (:func:`row_space_core`) serves every
    norm: with its ``R = [R_id, R_a]``, ``B_id A_id - B A`` has the norm of
    ``B_id R_id^T - B R_a^T`` (an ``(m, q)`` matrix, float64). The error stays ~1e-16 of the
    operands' norms, so a gap that vanishes exactly (FFA-LoRA) reads as zero up to rounding.
    """
    a_id, b_id = ideal_pair
    dtype = torch.float64
    k = a_id.shape[0]
    core = row_space_core(torch.cat([a_id.to(dtype), a.to(dtype)], dim=0))  # (q, k + r)
    if core.numel() == 0:
        return 0.0, [0.0 for _ in bs]
    ideal = b_id.to(dtype) @ core[:, :k].T  # (m, q)
    tail = core[:, k:].T  # (r, q)
    gaps = [float(torch.linalg.matrix_norm(ideal - b.to(dtype) @ tail)) for b in bs]
    return float(torch.linalg.matrix_norm(ideal)), gaps


def factored_fro_norm(b: Tensor, a: Tensor) -> float:
    """Return ``||B @ A||_F`` without forming the ``(m, n)`` product.

    One thin QR of the factor with the smaller outer dimension, in float64: ``A^T = Q_A R_A`` gives
    ``||B A||_F = ||B R_A^T||_F`` (an ``(m, q)`` matrix, ``q <= R``), and symmetrically
    ``B = Q_B R_B`` gives ``||R_B A||_F``. Cost: one QR of a ``(max, R)`` panel and one
    ``R``-inner-dimension product, never ``m n``. Unlike the Gram form
    ``sqrt(tr((B^T B)(A A^T)))``, which squares the operands and loses half the digits to
    cancellation for differences written as stacked factors (``[B_1, -B_2] @ [A_1; A_2]``; relative
    error ~1e-8 of the operands' norm), the error stays ~1e-16 of ``||B|| ||A||``.
    """
    if b.numel() == 0 or a.numel() == 0:
        return 0.0
    if a.shape[1] <= b.shape[0]:  # n <= m: QR the A side (an (n, R) panel)
        return fro_through_core(b, row_space_core(a))
    r_b = torch.linalg.qr(b.double(), mode="r").R  # (min(m, R), R)
    return float(torch.linalg.matrix_norm(r_b @ a.double()))  # (q, n)


def product_singular_values(b: Tensor, a: Tensor) -> Tensor:
    """The singular values of ``B @ A`` (descending, float64) without forming the ``(m, n)`` product.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QRs) give ``B A = Q_B (R_B R_A^T) Q_A^T`` with orthonormal
    ``Q``s, so ``B A`` has the singular values of the ``r x r`` core ``R_B R_A^T`` (``R_A``:
    :func:`row_space_core`).
    """
    r_b = torch.linalg.qr(b.double(), mode="r").R
    values: Tensor = torch.linalg.svdvals(r_b @ row_space_core(a).T)
    return values


def top_energy_share(b: Tensor, a: Tensor, k: int) -> float:
    """The share of ``||B A||_F^2`` in the top ``k`` singular directions of ``B A`` (1.0 for a zero product):
    what a client of rank ``k`` keeps of that product when it is truncated by SVD (FlexLoRA's redistribution)."""
    energy = product_singular_values(b, a) ** 2
    total = float(energy.sum())
    return 1.0 if total == 0.0 else float(energy[:k].sum()) / total


SIMPLE_WEIGHTINGS = ("examples", "uniform")


def check_weighting(weighting: str) -> str:
    """Return ``weighting`` if it is ``"examples"`` or ``"uniform"``, else raise ``ValueError``."""
    if weighting not in SIMPLE_WEIGHTINGS:
        raise ValueError(
            f"strategy.weighting={weighting!r} is not one of {SIMPLE_WEIGHTINGS}; use 'examples' "
            "(sample-count weights) or 'uniform'"
        )
    return weighting


def participant_weights(weighting: str, num_examples: Sequence[int]) -> list[float]:
    """``p_k`` over the participants: by example count (``"examples"``) or ``1/K`` (``"uniform"``)."""
    if weighting == "uniform":
        return [1.0 / len(num_examples)] * len(num_examples)
    return example_weights(num_examples)


def truncate_merge(pair: LoraPair, residual: Tensor | None, rank: int) -> tuple[LoraPair, Tensor, float, float]:
    r"""The best rank-``rank`` approximation of a base merge plus what earlier truncations left out.

    ``T = B A + E`` (``E``: the dense ``residual``, ``None`` for zero) is formed densely in float64 and
    split by its SVD ``U S V^T``; the returned pair is ``(A_q, B_q) = (V_q^T, U_q S_q)`` at the merge's
    dtype (``q = min(rank, numerical rank of T)``, at least 1), and the new residual is ``T - B_q A_q``
    computed from the factors as they are returned, so that what the pair and the residual hold adds up to ``T`` exactly
    up to float64 rounding (error feedback: nothing dropped, only delayed). Also returned:
    ``||B_q A_q||_F^2`` and ``||T||_F^2``.
    """
    if rank < 1:
        raise ValueError(f"a merge is truncated to rank >= 1, not {rank}")
    target = pair.b.to(torch.float64) @ pair.a.to(torch.float64)
    if residual is not None:
        if tuple(residual.shape) != tuple(target.shape):
            raise ValueError(f"merge residual of shape {tuple(residual.shape)} for a merge of shape "
                             f"{tuple(target.shape)}")
        target = target + residual.to(torch.float64)
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    tol = float(s[0]) * max(target.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    q = max(1, min(rank, int((s > tol).sum())))  # no component of a numerically zero singular value
    dtype = pair.a.dtype
    a_q, b_q = vh[:q].to(dtype).contiguous(), (u[:, :q] * s[:q]).to(dtype).contiguous()
    sent = b_q.to(torch.float64) @ a_q.to(torch.float64)
    return LoraPair(a=a_q, b=b_q), target - sent, float(sent.square().sum()), float(target.square().sum())
