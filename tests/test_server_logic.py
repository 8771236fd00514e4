"""Server-side pieces that need no Ray: sampling and folding merges into the saved adapter."""

from __future__ import annotations

import torch

from fedlora.adapters import lora_math as lm
from fedlora.flower.server_app import sample_clients


def test_sampling_is_seeded_sorted_and_sized() -> None:
    ids = list(range(100))
    a = sample_clients(ids, 0.1, server_round=3, seed=7)
    assert a == sample_clients(ids, 0.1, server_round=3, seed=7)
    assert a != sample_clients(ids, 0.1, server_round=4, seed=7)
    assert len(a) == 10 and a == sorted(a)
    assert sample_clients(ids, 0.001, server_round=1, seed=0, min_clients=3) != []
    assert len(sample_clients(ids, 0.001, server_round=1, seed=0, min_clients=3)) == 3
    assert sample_clients([4, 2], 1.0, server_round=1, seed=0) == [2, 4]


def test_folded_adapter_product_equals_global_plus_merges() -> None:
    # The saved adapter must load on the pristine base: fold s*B_g@A_g and the merges into one LoRA.
    from types import SimpleNamespace

    from fedlora.flower.server_app import Federation

    torch.manual_seed(0)
    m, n, r = 6, 5, 3
    adapter = {"l.lora_A.weight": torch.randn(r, n), "l.lora_B.weight": torch.randn(m, r), "head": torch.ones(2)}
    merges = [{"l": (torch.randn(m, 4), torch.randn(4, n))}, {"l": (torch.randn(m, 2), torch.randn(2, n))}]
    fed = Federation.__new__(Federation)
    fed.history = merges
    fed.ws = SimpleNamespace(host=SimpleNamespace(settings=SimpleNamespace(scaling=lambda rank: 2.0,
                                                                             alpha=lambda rank: 2.0 * rank)))
    folded, rank, alpha = fed.folded_adapter(adapter, r)
    assert rank == r + 6 and alpha == float(rank)  # scaling 1
    expected = 2.0 * adapter["l.lora_B.weight"] @ adapter["l.lora_A.weight"] + sum(b @ a for b, a in
                                                                                   (mm["l"] for mm in merges))
    got = (alpha / rank) * folded["l.lora_B.weight"] @ folded["l.lora_A.weight"]
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(folded["head"], adapter["head"])
    assert lm.rank_of(folded) == rank
