"""Update checks (fedlora.core.validation) and fault injection (fedlora.core.faults), no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.core import validation as v
from fedlora.core.faults import CORRUPT_KINDS, FaultSettings, corrupt_state, decide, kind_name

M, N = 6, 5  # layer (out, in)


def _state(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in ("l0.q", "l0.v"):
        out[f"{layer}.lora_A.weight"] = torch.randn(rank, N, generator=g)  # A: (r, n)
        out[f"{layer}.lora_B.weight"] = torch.randn(M, rank, generator=g)  # B: (m, r)
    out["head.weight"] = torch.randn(3, N, generator=g)
    return out


def test_a_well_formed_update_passes() -> None:
    start = _state(4)
    assert v.check_update(v.expected_shapes(start), _state(4, seed=1), rank=4, reported_rank=4) is None


EXPECTED_REASON = {"nan": "1 NaN value(s) in l0.q.lora_B.weight", "inf": "1 infinite value(s) in l0.q.lora_B.weight",
                   "shape": "wrong shape: l0.q.lora_B.weight", "rank": "wrong rank: the LoRA factors have rank 5 but "
                   "rank 4 was assigned", "missing_key": "missing keys: l0.q.lora_B.weight (1 of 5",
                   "extra_key": "unexpected keys: injected.extra.weight"}


@pytest.mark.parametrize("kind", sorted(EXPECTED_REASON))
def test_each_malformed_kind_is_named(kind: str) -> None:
    start = _state(4)
    bad = corrupt_state(_state(4, seed=1), start, kind)
    reason = v.check_update(v.expected_shapes(start), bad, rank=4)
    assert reason is not None and EXPECTED_REASON[kind] in reason, reason


def test_reported_rank_and_non_float_and_partial_sends() -> None:
    start = _state(4)
    assert "reports rank 8 but rank 4" in v.check_update(v.expected_shapes(start), start, 4, reported_rank=8)
    ints = dict(start, **{"head.weight": torch.zeros(3, N, dtype=torch.int64)})
    assert "non-floating-point" in v.check_update(v.expected_shapes(start), ints, 4)
    # FFA-LoRA: A stays on the client; only the keys that had to be sent are expected
    sent = sorted(k for k in start if "lora_A" not in k)
    b_only = {k: start[k] for k in sent}
    assert v.check_update(v.expected_shapes(start, sent), b_only, 4) is None
    assert "unexpected keys" in v.check_update(v.expected_shapes(start, sent), start, 4)


def test_a_few_wrong_shapes_are_not_called_a_rank_change() -> None:
    start = _state(4)
    bad = dict(start, **{"head.weight": torch.zeros(2, N)})
    assert v.check_update(v.expected_shapes(start), bad, 4).startswith("wrong shape: head.weight")


def test_scale_corruption_is_a_norm_outlier() -> None:
    starts = {c: _state(4, seed=10 + c) for c in range(4)}
    trained = {c: {k: t + 0.01 * (c + 1) for k, t in starts[c].items()} for c in range(4)}
    trained[3] = corrupt_state(trained[3], starts[3], "scale")
    norms = {c: v.change_norm(trained[c], starts[c]) for c in range(4)}
    out = v.norm_outliers(norms, 10.0)
    assert list(out) == [3] and "max_norm_ratio=10" in out[3]
    assert v.norm_outliers(norms, None) == {}


def test_norm_outliers_median_of_the_others() -> None:
    assert v.norm_outliers({0: 1.0, 1: 2.0, 2: 3.0}, 10.0) == {}
    assert list(v.norm_outliers({0: 1.0, 1: 1.2, 2: 50.0}, 10.0)) == [2]
    # two updates: the huge one is rejected, the normal one is not (its yardstick is the huge one)
    assert list(v.norm_outliers({0: 1.0, 1: 100.0}, 10.0)) == [1]
    assert v.norm_outliers({0: 5.0}, 10.0) == {}  # nothing to compare with
    assert v.norm_outliers({0: 0.0, 1: 0.0, 2: 3.0}, 10.0) == {}  # no scale to compare with
    assert math.isclose(v.change_norm({"a": torch.tensor([3.0, 4.0])}, {"a": torch.zeros(2)}), 5.0)


def test_fault_decisions_are_deterministic_and_follow_the_probabilities() -> None:
    s = FaultSettings(fail_prob=0.3, straggler_prob=0.2, straggler_delay_s=7.0, corrupt_prob=0.1)
    draws = [decide(s, 0, r, c) for r in range(1, 101) for c in range(20)]
    assert draws == [decide(s, 0, r, c) for r in range(1, 101) for c in range(20)]
    assert 0.25 < sum(d.fail for d in draws) / len(draws) < 0.35
    assert 0.16 < sum(d.delay_s == 7.0 for d in draws) / len(draws) < 0.24
    assert 0.07 < sum(d.corrupt == "nan" for d in draws) / len(draws) < 0.13
    assert draws != [decide(s, 1, r, c) for r in range(1, 101) for c in range(20)]  # the seed matters
    fixed = FaultSettings(seed=5, fail_prob=0.5)
    assert decide(fixed, 0, 1, 1) == decide(fixed, 9, 1, 1)
    none = FaultSettings()
    assert all(decide(none, 0, r, c) == decide(none, 3, 1, 1) for r in range(5) for c in range(5))
    assert not decide(none, 0, 1, 1).fail and decide(none, 0, 1, 1).corrupt is None


def test_fault_settings_from_config() -> None:
    s = FaultSettings.from_config({"fail_prob": 0.5, "corrupt": {"2": float("nan"), 3: "rank"},
                                   "corrupt_kind": float("inf")})
    assert s.corrupt == ((2, "nan"), (3, "rank")) and s.corrupt_kind == "inf" and s.fail_prob == 0.5
    assert hash(s) == hash(FaultSettings.from_config({"fail_prob": 0.5, "corrupt": {3: "rank", 2: "nan"},
                                                      "corrupt_kind": "inf"}))  # settings are hashable
    assert decide(s, 0, 4, 3).corrupt == "rank"
    assert FaultSettings.from_config(None) == FaultSettings()
    assert kind_name(float("-inf")) == "inf" and kind_name("shape") == "shape"
    assert set(CORRUPT_KINDS) == set(EXPECTED_REASON) | {"scale"}
    with pytest.raises(ValueError, match="corrupt_kind='bogus'"):
        corrupt_state(_state(2), _state(2), "bogus")
