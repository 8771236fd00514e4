"""Unbiased random-k (fedlora.compression.randk): SCALLION's compressor.

Its two defining moments against the formulas (``E[C(v)] = v`` and ``E||C(v) - v||^2 = (n/k - 1) ||v||^2``)
over many seeds, the code against a direct construction, its size, and its refusals.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.compression.randk import RandK, positions, tensor_seed
from fedlora.compression.scafcom import SCAFCOM


def test_the_code_is_the_values_at_the_seeds_positions_times_n_over_k() -> None:
    v = {"w": torch.arange(1.0, 21.0).reshape(4, 5), "b": torch.tensor([0.5, -2.0, 3.0])}
    comp = RandK(density=0.25)
    payload, residual = comp.compress(v, None, seed=7)
    assert residual == {}
    out = comp.decode(payload)
    for key, value in v.items():
        n = value.numel()
        k = comp.num_kept(n)
        pos = positions(n, k, tensor_seed(7, key))
        expected = torch.zeros(n)
        expected[pos] = value.reshape(-1)[pos] * (n / k)
        torch.testing.assert_close(out[key], expected.reshape(value.shape), rtol=0, atol=0)
        assert int(torch.count_nonzero(out[key])) == k
    assert payload["w|val"].nbytes == 4 * 5 and payload["w|hdr"].nbytes <= 16  # k float32 and a few header bytes
    again = comp.decode(comp.compress(v, None, seed=7)[0])
    other = comp.decode(comp.compress(v, None, seed=8)[0])
    assert torch.equal(again["w"], out["w"]) and not torch.equal(other["w"], out["w"])


def test_it_is_unbiased_with_the_variance_the_formula_gives() -> None:
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(40, generator=gen)
    comp = RandK(density=0.1)  # k = 4, omega = 9
    draws = torch.stack([comp.decode(comp.compress({"v": v}, None, seed=s)[0])["v"] for s in range(6000)])
    mean = draws.mean(dim=0)
    # the mean of 6000 draws: each entry's standard error is |v_i| sqrt(omega / 6000) ~ 0.04 |v_i|
    assert float((mean - v).norm() / v.norm()) < 0.1
    error = float(((draws - v) ** 2).sum(dim=1).mean() / v.square().sum())
    assert error == pytest.approx(9.0, rel=0.05)


def test_density_one_is_the_identity_and_bad_input_is_named() -> None:
    v = {"w": torch.randn(3, 4)}
    comp = RandK(density=1.0)
    torch.testing.assert_close(comp.decode(comp.compress(v, None, seed=1)[0])["w"], v["w"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs a seed"):
        comp.compress(v, None)
    with pytest.raises(ValueError, match=r"compression.density=0 is not a fraction in \(0, 1\]"):
        RandK(density=0)
    with pytest.raises(ValueError, match="non-finite"):
        comp.compress({"w": torch.tensor([float("nan")])}, None, seed=1)
    with pytest.raises(ValueError, match="are ComPEFT's"):
        SCAFCOM(codec="rand_k", scale="none")
    with pytest.raises(ValueError, match="compression.codec='top_k' is not one of"):
        SCAFCOM(codec="top_k")
