"""FlexLoRA against a dense reference: the SVD of the weighted product average, formed as an m x n matrix.

The strategy never forms that matrix (Gram matrices of the stacked factors, an eigendecomposition of
the small core); here it is
formed in float64 and decomposed with ``torch.linalg.svd``, and the strategy must agree with it:
the global adapter is its best rank-``r_max`` approximation (Eckart-Young: the error is the norm of
the dropped singular values), each client's plan its best rank-``r_k`` approximation, the core has
its singular values, the logged energy is the kept share, and when the stacked rank fits the
aggregate is exact. Also: mixed ranks, the head, and the weighting options.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, ClientUpdate
from strategies.flexlora import FlexLoRA, product_svd

S = 2.0
MODULES = {"enc.q": (9, 7), "enc.v": (6, 11)}  # non-square, m != n
HEAD = {"classifier.weight": torch.zeros(3, 7), "classifier.bias": torch.zeros(3)}


def client(cid: int, rank: int, examples: int, seed: int) -> ClientUpdate:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for module, (m, n) in MODULES.items():
        state[lm.lora_a_key(module)] = torch.randn((rank, n), generator=gen, dtype=torch.float64)
        state[lm.lora_b_key(module)] = torch.randn((m, rank), generator=gen, dtype=torch.float64)
    state["classifier.weight"] = torch.randn((3, 7), generator=gen, dtype=torch.float64)
    state["classifier.bias"] = torch.randn((3,), generator=gen, dtype=torch.float64)
    return ClientUpdate(cid, rank, S, examples, state)


def dense_average(updates: list[ClientUpdate], weights: list[float], module: str) -> torch.Tensor:
    return sum(w * (u.state[lm.lora_b_key(module)] @ u.state[lm.lora_a_key(module)])
               for u, w in zip(updates, weights, strict=True))


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def global_adapter(r_max: int) -> dict:
    spec = AdapterSpec(MODULES, r_max, S, {k: v.double() for k, v in HEAD.items()})
    return {k: v.double() for k, v in FlexLoRA().init(spec, seed=3).adapter.items()}


UPDATES = [client(0, 4, 10, 1), client(1, 2, 30, 2), client(2, 1, 60, 3)]  # stacked rank 7


@pytest.mark.parametrize("r_max", [2, 3, 4])
def test_the_global_adapter_is_the_best_rank_r_max_approximation_of_the_product_average(r_max: int) -> None:
    result = FlexLoRA().aggregate(global_adapter(r_max), {}, UPDATES, server_round=1)
    weights = lm.example_weights([u.num_examples for u in UPDATES])
    kept, total = 0.0, 0.0
    for module in MODULES:
        dense = dense_average(UPDATES, weights, module)
        b, a = result.adapter[lm.lora_b_key(module)], result.adapter[lm.lora_a_key(module)]
        assert a.shape[0] == b.shape[1] == r_max
        assert torch.allclose(b @ a, best_rank(dense, r_max), atol=1e-10)
        sigma = torch.linalg.svdvals(dense)
        # Eckart-Young: what is dropped is exactly the tail of the singular values
        assert float(torch.linalg.matrix_norm(dense - b @ a)) == pytest.approx(float(sigma[r_max:].norm()), abs=1e-9)
        assert torch.allclose(a @ a.T, torch.eye(r_max, dtype=torch.float64), atol=1e-10)  # A = V_r^T
        kept += float((sigma[:r_max] ** 2).sum())
        total += float((sigma**2).sum())
    assert result.metrics["svd_energy_kept"] == pytest.approx(kept / total, rel=1e-12)
    assert result.metrics["svd_energy_kept"] < 1.0


def test_the_core_has_the_dense_singular_values_and_the_stacked_rank_fits_exactly() -> None:
    weights = [0.2, 0.3, 0.5]
    for module in MODULES:
        pairs = [lm.split_state(u.state)[0][module] for u in UPDATES]
        u, s, v = product_svd(pairs, weights)
        dense = dense_average(UPDATES, weights, module)
        assert torch.allclose(s, torch.linalg.svdvals(dense)[: s.shape[0]], atol=1e-10)
        assert torch.allclose(u @ torch.diag(s) @ v.T, dense, atol=1e-10)
    # r_max at least the stacked rank (7): the global model is the exact product average
    result = FlexLoRA().aggregate(global_adapter(8), {}, UPDATES, server_round=1)
    weights = lm.example_weights([u.num_examples for u in UPDATES])
    for module in MODULES:
        product = result.adapter[lm.lora_b_key(module)] @ result.adapter[lm.lora_a_key(module)]
        assert torch.allclose(product, dense_average(UPDATES, weights, module), atol=1e-10)
    assert result.metrics["svd_energy_kept"] == pytest.approx(1.0, abs=1e-12)


def test_each_client_receives_the_best_approximation_at_its_own_rank() -> None:
    strategy = FlexLoRA()
    result = strategy.aggregate(global_adapter(4), {}, UPDATES, server_round=1)
    weights = lm.example_weights([u.num_examples for u in UPDATES])
    for rank in (1, 2, 4):
        plan = strategy.plan(result.adapter, result.state, client_id=0, rank=rank, server_round=2, seed=0)
        assert plan.adapter is not None and plan.rank == rank
        for module in MODULES:
            b, a = plan.adapter[lm.lora_b_key(module)], plan.adapter[lm.lora_a_key(module)]
            assert b.shape[1] == a.shape[0] == rank
            assert torch.allclose(b @ a, best_rank(dense_average(UPDATES, weights, module), rank), atol=1e-10)


def test_the_head_and_the_weightings() -> None:
    uniform = FlexLoRA(weighting="uniform").aggregate(global_adapter(8), {}, UPDATES, server_round=1)
    by_examples = FlexLoRA().aggregate(global_adapter(8), {}, UPDATES, server_round=1)
    for key in HEAD:
        assert torch.allclose(uniform.adapter[key], sum(u.state[key] for u in UPDATES) / 3, atol=1e-12)
        assert torch.allclose(by_examples.adapter[key], sum(u.num_examples * u.state[key] for u in UPDATES) / 100,
                              atol=1e-12)
    for module in MODULES:
        product = uniform.adapter[lm.lora_b_key(module)] @ uniform.adapter[lm.lora_a_key(module)]
        assert torch.allclose(product, dense_average(UPDATES, [1 / 3] * 3, module), atol=1e-10)
    with pytest.raises(ValueError, match="strategy.weighting='norm'"):
        FlexLoRA(weighting="norm")


def test_a_large_module_is_aggregated_without_its_dense_matrix() -> None:
    # 4096 x 4096 with three clients of rank 8: the dense product would be 128 MiB in float64; the
    # factored path works on (4096, 24) blocks. The result is checked through a random probe.
    gen = torch.Generator().manual_seed(0)
    m = n = 4096
    pairs = [(torch.randn((8, n), generator=gen, dtype=torch.float64),
              torch.randn((m, 8), generator=gen, dtype=torch.float64)) for _ in range(3)]
    u, s, v = product_svd(pairs, [0.5, 0.25, 0.25])
    assert u.shape == (m, 24) and v.shape == (n, 24) and s.shape == (24,)
    x = torch.randn((n, 2), generator=gen, dtype=torch.float64)
    expected = sum(w * (b @ (a @ x)) for (a, b), w in zip(pairs, [0.5, 0.25, 0.25], strict=True))
    assert torch.allclose(u @ (s[:, None] * (v.T @ x)), expected, rtol=1e-9, atol=1e-8)


def test_a_rank_deficient_product_gives_zero_components_not_noise() -> None:
    # Two clients with the same factors and one that did not move (B = 0): Delta has rank 2 of the
    # stacked 6. The components beyond are exactly zero (no division by a noise-level singular value),
    # the rank-4 adapter reproduces Delta and its A rows beyond the rank are zero slots.
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn((2, 11), generator=gen, dtype=torch.float64), torch.randn((6, 2), generator=gen,
                                                                                 dtype=torch.float64)
    pairs = [(a, b), (a.clone(), b.clone()), (torch.randn((2, 11), generator=gen, dtype=torch.float64),
                                              torch.zeros((6, 2), dtype=torch.float64))]
    u, s, v = product_svd(pairs, [0.25, 0.25, 0.5], rank=4)
    assert s.shape == (6,) and bool((s[2:] == 0).all()) and bool((s[:2] > 0).all())
    assert u.shape == (6, 2) and v.shape == (11, 2) and bool(torch.isfinite(u).all() and torch.isfinite(v).all())
    assert torch.allclose(u @ torch.diag(s[:2]) @ v.T, 0.5 * (b @ a), atol=1e-12)


def test_singular_values_over_five_decades_are_resolved() -> None:
    # Delta = U diag(1, 1e-1, ..., 1e-5) V^T as three stacked clients: the top components to 1e-10 of the
    # largest, as the dense SVD has them (the Gram form's limit is about 2e-7 of the largest).
    gen = torch.Generator().manual_seed(6)
    m, n = 40, 30
    u0 = torch.linalg.qr(torch.randn((m, 6), generator=gen, dtype=torch.float64)).Q
    v0 = torch.linalg.qr(torch.randn((n, 6), generator=gen, dtype=torch.float64)).Q
    sig = torch.tensor([1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5], dtype=torch.float64)
    pairs = [((v0[:, i:i + 2] * sig[i:i + 2]).T.contiguous(), u0[:, i:i + 2].contiguous()) for i in (0, 2, 4)]
    u, s, v = product_svd(pairs, [1.0, 1.0, 1.0], rank=4)
    assert torch.allclose(s, sig, rtol=0, atol=1e-10)
    dense = u0 @ torch.diag(sig) @ v0.T
    assert torch.allclose(u @ torch.diag(s[:4]) @ v.T, best_rank(dense, 4), atol=1e-10)
    assert torch.allclose(v.T @ v, torch.eye(4, dtype=torch.float64), atol=1e-12)
