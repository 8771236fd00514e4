"""ComPEFT uplink compression (strategies/compeft.py), algorithms.md §5 and §8.8."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.compression.compeft import ComPEFT, encoded_bits, rice_parameter


def gaussian(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def roundtrip(comp, delta, residual=None):
    payload, res = comp.compress(delta, residual)
    return payload, comp.decode(payload), res


# -- hyperparameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.0001, 1.5, 20, 100, True, "0.1", float("nan")])
def test_density_must_be_a_fraction(density):
    # Regression: ComPEFT's --k is an integer percent and values > 1 are divided by 100, so k=1 is
    # read as the fraction 1 and raises in kthvalue(0). Here density is a fraction; percent-style
    # values raise instead of guessing.
    with pytest.raises(ValueError, match="compression.density"):
        ComPEFT(density=density)


def test_density_one_keeps_everything_not_one_percent():
    v = gaussian(0, 40, 25)
    comp = ComPEFT(density=1, scale="std")
    _, out, _ = roundtrip(comp, {"w": v})
    assert comp.num_kept(1000) == 1000
    assert int((out["w"] != 0).sum()) == v.numel()  # every entry kept (Gaussian: no exact zeros)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"scale": "signed_mean"}, "compression.scale"),
        ({"alpha": 0.0}, "compression.alpha"),
        ({"alpha": -1.0}, "compression.alpha"),
        ({"alpha": float("inf")}, "compression.alpha"),
        ({"scale": "none", "alpha": 2.0}, "compression.alpha"),
        ({"error_feedback": "yes"}, "compression.error_feedback"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ComPEFT(**kwargs)


# -- the identity and ternary values ------------------------------------------------------------------------


def test_density_one_without_scale_is_the_identity_bit_for_bit():
    v = gaussian(1, 33, 17)
    v[0, 0] = -0.0
    v[1, 1] = 0.0
    delta = {"a.lora_A.weight": v, "a.lora_B.weight": gaussian(2, 17, 4), "head": gaussian(3, 5)}
    comp = ComPEFT(density=1.0, scale="none")
    _, out, res = roundtrip(comp, delta)
    for key, value in delta.items():
        assert out[key].dtype == torch.float32 and out[key].shape == value.shape
        assert torch.equal(out[key].view(torch.int32), value.view(torch.int32))  # bit for bit, -0.0 included
        assert torch.all(res[key] == 0)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.3, 0.5])
def test_ternary_support_signs_and_exact_k(density):
    v = gaussian(4, 64, 48)
    comp = ComPEFT(density=density, scale="std")
    _, out, _ = roundtrip(comp, {"w": v})
    w = out["w"]
    k = max(1, round(density * v.numel()))
    support = w != 0
    assert int(support.sum()) == k  # exactly k
    sigma = float(np.std(v.numpy().astype(np.float64)))
    values = torch.unique(w).tolist()  # ternary {-s, 0, +s}
    assert len(values) == 3 and values[1] == 0.0 and values[0] == -values[2]
    assert values[2] == pytest.approx(sigma, rel=1e-6)
    assert torch.all(torch.sign(w[support]) == torch.sign(v[support]))  # signs preserved
    assert float(v[support].abs().min()) >= float(v[~support].abs().max())  # top-k by magnitude


def test_alpha_multiplies_the_std_scale():
    v = gaussian(5, 1000)
    s1 = roundtrip(ComPEFT(density=0.2), {"w": v})[1]["w"].abs().max()
    s2 = roundtrip(ComPEFT(density=0.2, alpha=2.5), {"w": v})[1]["w"].abs().max()
    assert float(s2) == pytest.approx(2.5 * float(s1), rel=1e-6)


def test_std_is_taken_over_the_whole_tensor_before_sparsification():
    v = torch.zeros(100)
    v[:10] = torch.linspace(1.0, 2.0, 10)
    out = roundtrip(ComPEFT(density=0.05), {"w": v})[1]["w"]
    assert float(out.abs().max()) == pytest.approx(float(v.numpy().std()), rel=1e-6)


def test_mean_abs_scale_is_the_l2_optimum_not_the_signed_mean():
    # Regression: ComPEFT's STC mode (replace_factor=-2) averages the *signed* kept values (≈ 0 on
    # symmetric updates). mean_abs uses mean |v| on the support, which minimises the L2 error.
    v = gaussian(6, 5000)
    comp = ComPEFT(density=0.1, scale="mean_abs", error_feedback=True)
    _, out, res = roundtrip(comp, {"w": v})
    support = out["w"] != 0
    s = float(out["w"].abs().max())
    assert s == pytest.approx(float(v[support].abs().mean()), rel=1e-6)
    assert abs(float(v[support].mean())) < 0.2 * s  # what the signed mean would have given
    err = float(res["w"].norm())
    for factor in (0.9, 1.1):
        other = torch.where(support, factor * s * torch.sign(v), torch.zeros(()))
        assert float((v - other).norm()) > err
    std_err = float(roundtrip(ComPEFT(density=0.1, scale="std"), {"w": v})[2]["w"].norm())
    assert err <= std_err


def test_ties_are_broken_towards_lower_indices_and_exactly_k_kept():
    v = torch.ones(50)
    v[7] = -1.0
    out = roundtrip(ComPEFT(density=0.1), {"w": v})[1]["w"]
    assert torch.equal(torch.nonzero(out).flatten(), torch.arange(5))
    v2 = torch.full((50,), 0.5)
    v2[40] = 3.0
    out2 = roundtrip(ComPEFT(density=0.1), {"w": v2})[1]["w"]
    assert torch.equal(torch.nonzero(out2).flatten(), torch.tensor([0, 1, 2, 3, 40]))


def test_k_is_at_least_one_and_rounded():
    comp = ComPEFT(density=0.1)
    assert [comp.num_kept(n) for n in (0, 1, 3, 14, 15, 1000)] == [0, 1, 1, 1, 2, 100]
    out = roundtrip(comp, {"w": gaussian(7, 3)})[1]["w"]
    assert int((out != 0).sum()) == 1


def test_degenerate_tensors():
    comp = ComPEFT(density=0.1)
    delta = {
        "zeros": torch.zeros(20, 3),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
        "sparse": torch.zeros(100),
    }
    delta["sparse"][[3, 50]] = torch.tensor([2.0, -1.0])  # fewer non-zeros than k = 10
    _, out, res = roundtrip(comp, delta)
    assert torch.all(out["zeros"] == 0) and torch.all(res["zeros"] == 0)
    assert out["empty"].shape == (0, 4) and out["scalar"].shape == ()
    assert float(out["scalar"]) == 0.0  # std of one value is 0 (ComPEFT's rule); kept in the residual
    assert float(res["scalar"]) == 1.5
    assert torch.equal(torch.nonzero(out["sparse"]).flatten(), torch.tensor([3, 50]))  # no ±s on zeros


# -- the encoding --------------------------------------------------------------------------------------------


@given(
    shape=st.sampled_from([(1,), (7,), (13, 5), (64, 48), (3, 1000), (2, 3, 4)]),
    density=st.sampled_from([1e-3, 0.01, 0.05, 0.1, 0.37, 0.5, 0.9, 1.0]),
    scale=st.sampled_from(["std", "mean_abs", "none"]),
    pattern=st.sampled_from(["gauss", "clustered_end", "clustered_start"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_decode_inverts_the_encoding(shape, density, scale, pattern, seed):
    v = gaussian(seed, *shape)
    if scale == "std" and v.numel() == 1:
        v = torch.cat([v.view(-1), -0.5 * v.view(-1)])  # std of a single entry is 0: nothing to see
    flat = v.view(-1)
    if pattern == "clustered_end":  # a huge first gap
        flat[: flat.numel() * 9 // 10] *= 1e-3
    elif pattern == "clustered_start":
        flat[flat.numel() // 10 :] *= 1e-3
    comp = ComPEFT(density=density, scale=scale)
    payload, res = comp.compress({"m.lora_B.weight": v}, None)
    out = comp.decode(payload)["m.lora_B.weight"]
    # reference top-k: k largest |v|, ties to the lower index (stable sort)
    k = comp.num_kept(v.numel())
    order = np.argsort(-np.abs(flat.numpy()), kind="stable")[:k]
    expected = np.zeros(v.numel(), dtype=bool)
    expected[order] = True
    if scale != "none":
        expected &= flat.numpy() != 0  # a sign bit cannot encode 0: zeros leave the support
    got = (out != 0).view(-1).numpy()
    assert np.array_equal(got, expected)
    assert torch.all(torch.sign(out.view(-1)[got]) == torch.sign(flat[got]))
    if scale == "none":
        assert torch.equal(out.view(-1)[got], flat[got])
    # encoder's view of the decoded values is the decoder's (residual = v - decoded)
    assert torch.equal(res["m.lora_B.weight"], v - out)
    # payload names are reversible and the arrays are plain numpy of the documented dtypes
    assert {name.rpartition("|")[0] for name in payload} == {"m.lora_B.weight"}
    for name, arr in payload.items():
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == {"scale": np.float32, "val": np.float32}.get(
            name.rpartition("|")[2], np.uint8
        )


def test_error_feedback_loses_nothing_over_rounds():
    comp = ComPEFT(density=0.05, scale="std", error_feedback=True)
    shapes = {"a.lora_A.weight": (4, 30), "a.lora_B.weight": (20, 4)}
    total_delta = {k: torch.zeros(s) for k, s in shapes.items()}
    total_sent = {k: torch.zeros(s) for k, s in shapes.items()}
    residual = None
    for rnd in range(12):
        delta = {
            k: gaussian(100 * rnd + i, *s) * (0.01 if "B" in k else 1.0)
            for i, (k, s) in enumerate(shapes.items())
        }
        payload, residual = comp.compress(delta, residual)
        decoded = comp.decode(payload)
        for k in shapes:
            total_delta[k] += delta[k]
            total_sent[k] += decoded[k]
    for k in shapes:
        assert torch.allclose(total_sent[k] + residual[k], total_delta[k], atol=1e-5)


def test_without_error_feedback_nothing_is_kept_and_the_encoding_is_the_same():
    delta = {"w": gaussian(8, 100)}
    off = ComPEFT(density=0.1, error_feedback=False)
    payload_off, res = off.compress(delta, None)
    assert res == {}
    payload_on, res_on = ComPEFT(density=0.1).compress(delta, None)
    assert payload_off.keys() == payload_on.keys()
    assert all(np.array_equal(payload_off[k], payload_on[k]) for k in payload_on) and set(res_on) == {"w"}
    with pytest.raises(ValueError, match="residual"):  # a residual where none is carried is a caller's bug
        off.compress(delta, {"w": gaussian(9, 100)})


def test_fresh_factors_keep_the_heads_residual_only():
    """FLoRA starts fresh LoRA factors every round: their residual would land on a new random A and a
    zero B, so it is dropped; the classifier head continues from the global adapter and keeps its own,
    so nothing of the head's updates is lost over the rounds."""
    comp = ComPEFT(density=0.05)
    continuing = {"classifier.weight"}  # what fedlora.core.lora_math.continues says for a fresh plan
    shapes = {"a.lora_A.weight": (4, 30), "a.lora_B.weight": (20, 4), "classifier.weight": (5, 40)}
    head_total, head_sent = torch.zeros(5, 40), torch.zeros(5, 40)
    residual = None
    for rnd in range(10):
        delta = {k: gaussian(50 * rnd + i, *s) for i, (k, s) in enumerate(shapes.items())}
        payload, residual = comp.compress(delta, residual, continuing)
        assert set(residual) == {"classifier.weight"}
        head_total += delta["classifier.weight"]
        head_sent += comp.decode(payload)["classifier.weight"]
    assert torch.allclose(head_sent + residual["classifier.weight"], head_total, atol=1e-5)
    with pytest.raises(ValueError, match="carry one"):  # a residual of a fresh factor is refused
        comp.compress(delta, {**residual, "a.lora_A.weight": torch.zeros(4, 30)}, continuing)


def test_residual_none_equals_zero_residual_and_mismatches_raise():
    comp = ComPEFT(density=0.1)
    v = {"w": gaussian(10, 50)}
    p1, _ = comp.compress(v, None)
    p2, _ = comp.compress(v, {"w": torch.zeros(50)})
    assert p1.keys() == p2.keys() and all(np.array_equal(p1[k], p2[k]) for k in p1)
    with pytest.raises(ValueError, match="residual"):
        comp.compress(v, {"x": torch.zeros(50)})
    with pytest.raises(ValueError, match="shape"):
        comp.compress(v, {"w": torch.zeros(5, 10)})
    with pytest.raises(ValueError, match="reserves"):
        comp.compress({"a|b": torch.zeros(3)}, None)
    with pytest.raises(ValueError, match="non-finite"):
        comp.compress({"w": torch.tensor([1.0, float("nan")])}, None)


def test_rice_parameter_matches_the_reference_optimum():
    # b* = 1 + floor(log2(log(φ-1) / log(1-p))) (algorithms.md §5): 5% -> 4, 10% -> 3, 20% -> 2
    assert [rice_parameter(p) for p in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)] == [4, 3, 2, 1, 0, 0]


def test_encoded_size_at_ten_percent():
    v = gaussian(11, 1000, 1000)  # 1M entries
    payload, _ = ComPEFT(density=0.1).compress({"w": v}, None)
    bits = encoded_bits(payload)
    assert bits == 8 * sum(arr.nbytes for arr in payload.values())  # the real size of the arrays
    bits_per_param = bits / v.numel()
    # §5: Golomb + sign at 10% = 5.76 bits per kept entry = 0.576 bits/param (55.6x vs fp32)
    assert bits_per_param <= 0.7
    assert 32 / bits_per_param >= 45
    p = 0.1
    b = rice_parameter(p)
    expected = b + 1 / (1 - (1 - p) ** (2**b)) + 1  # bits per kept entry
    assert bits / 100_000 == pytest.approx(expected, rel=0.02)


def test_a_llama_sized_upload_round_trips_at_under_0_7_bits_per_parameter():
    # 8.4M parameters (eight LLaMA-7B 4096 x 256 factors) at 10%; the time it takes is bench/aggregation.py's
    delta = {f"m{i}.lora_B.weight": gaussian(i, 4096, 256) for i in range(8)}
    comp = ComPEFT(density=0.1)
    payload, residual = comp.compress(delta, None)
    decoded = comp.decode(payload)
    assert all(torch.allclose(decoded[k] + residual[k], delta[k], atol=1e-6) for k in delta)  # nothing lost
    assert encoded_bits(payload) / sum(v.numel() for v in delta.values()) < 0.7


def test_bits_shrink_with_density():
    v = {"w": gaussian(12, 200, 500)}
    sizes = [encoded_bits(ComPEFT(density=d).compress(v, None)[0]) for d in (0.5, 0.3, 0.2, 0.1, 0.05)]
    assert all(x > y for x, y in zip(sizes, sizes[1:], strict=False))
    assert math.isclose(sizes[0] / v["w"].numel(), 1.5, rel_tol=0.05)  # §5 table: 1.500 bits/param at 50%


def test_composes_with_ffa_lora_uplink():
    # With FFA-LoRA only B (and the head) go up: the real client side of a round compresses what the
    # wire codec says travels, the server decodes it onto the start adapter and fills A in, so the
    # shared A stays bit-identical and FFA-LoRA accepts it.
    from federation_kit import MODULES, TinyTrainer

    from fedlora.core import lora_math as lm
    from fedlora.core.types import ClientUpdate
    from fedlora.federation import wire
    from fedlora.federation.client import ClientSide, MemoryStore, train_round
    from strategies.ffa_lora import FFALoRA

    strat = FFALoRA()
    init = strat.init(TinyTrainer.spec(4), seed=3)
    comp = ComPEFT(density=0.2)
    side = ClientSide(trainer=TinyTrainer(), compressor=comp)
    updates = []
    for cid in range(2):
        plan = strat.plan(init.adapter, init.state, client_id=cid, rank=4, server_round=1, seed=3)
        assignment = wire.Assignment(1, plan, lm.plan_start(plan, MODULES))
        reply = train_round(wire.encode_assignment(assignment), cid, side, MemoryStore())
        assert set(reply.arrays) == {"compressed"}
        received, report = wire.decode_reply(reply, assignment, comp)
        assert not any(lm.is_lora_a_key(k) for k in received)  # A never travelled
        updates.append(ClientUpdate(cid, 4, 2.0, report.num_examples, wire.complete(received, assignment.start)))
    res = strat.aggregate(init.adapter, init.state, updates, server_round=1)
    for module in MODULES:
        key = lm.lora_a_key(module)
        assert torch.equal(res.adapter[key], init.adapter[key])
    assert res.metrics["product_gap_rel"] < 1e-6


def test_rolora_keeps_each_factors_residual_for_the_round_it_is_sent_again():
    # RoLoRA sends B in odd rounds and A in even rounds. With error feedback, what compression dropped
    # from B in round 1 must come back in round 3 (not be lost in round 2, when B is not sent): over
    # the rounds a tensor is sent, the decoded updates plus the residual left equal the true updates.
    from federation_kit import MODULES, TinyTrainer

    from fedlora.core import lora_math as lm
    from fedlora.core.types import ClientUpdate
    from fedlora.federation import wire
    from fedlora.federation.client import ClientSide, MemoryStore, train_round
    from strategies.rolora import RoLoRA

    strat = RoLoRA()
    comp = ComPEFT(density=0.2)
    side = ClientSide(trainer=TinyTrainer(), compressor=comp)
    store = MemoryStore()
    glob = strat.init(TinyTrainer.spec(4), seed=3).adapter
    true_sum: dict = {}
    decoded_sum: dict = {}
    for server_round in (1, 2, 3):
        plan = strat.plan(glob, {}, client_id=0, rank=4, server_round=server_round, seed=3)
        assignment = wire.Assignment(server_round, plan, lm.plan_start(plan, MODULES))
        trained, _ = TinyTrainer().train(0, assignment, [])
        reply = train_round(wire.encode_assignment(assignment), 0, side, store)
        received, report = wire.decode_reply(reply, assignment, comp)
        factor = lm.is_lora_b_key if server_round % 2 else lm.is_lora_a_key
        assert {k for k in received if lm.is_lora_key(k)} == {k for k in assignment.start if factor(k)}
        for key in received:
            true_sum[key] = true_sum.get(key, 0) + trained[key] - assignment.start[key]
            decoded_sum[key] = decoded_sum.get(key, 0) + received[key] - assignment.start[key]
        assert set(store.kept) == set(true_sum)  # every factor sent so far keeps its residual
        update = ClientUpdate(0, 4, 2.0, report.num_examples, wire.complete(received, assignment.start))
        glob = strat.aggregate(glob, {}, [update], server_round=server_round).adapter
    for key in true_sum:
        assert torch.allclose(decoded_sum[key] + store.kept[key], true_sum[key], atol=1e-5), key
    b_key = lm.lora_b_key(next(iter(MODULES)))
    assert store.kept[b_key].abs().sum() > 0  # something was dropped, and carried


def test_the_header_is_varints_of_what_the_decoder_needs() -> None:
    from fedlora.core import varint

    v = gaussian(13, 384, 8)
    payload, _ = ComPEFT(density=0.1).compress({"w": v}, None)
    hdr = payload["w|hdr"]
    assert hdr.dtype == np.uint8 and hdr.size <= 14  # int64 took 80 bytes
    fields, end = varint.decode(hdr.tobytes(), 9)
    version, mode, numel, nnz, b, unary_bits, ndim, *shape = fields
    assert end == hdr.size and (version, mode, numel, nnz, ndim, shape) == (2, 0, 3072, 307, 2, [384, 8])
    positions = np.flatnonzero(ComPEFT(density=0.1).decode(payload)["w"].numpy().ravel())
    gaps = np.diff(positions, prepend=-1) - 1
    assert b == rice_parameter(307 / 3072) and unary_bits == int((gaps >> b).sum()) + nnz  # q ones + a zero each
    old = dict(payload, **{"w|hdr": np.frombuffer(varint.encode([1, *fields[1:]]), dtype=np.uint8)})
    with pytest.raises(ValueError, match="version 1"):
        ComPEFT(density=0.1).decode(old)
