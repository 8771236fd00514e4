"""The per-process model host: one base, one adapter per rank, exact base merges."""

from __future__ import annotations

import pytest
import torch

from fedlora.adapters import lora_math as lm
from fedlora.models import AdapterHost, ModelSettings


@pytest.fixture(scope="module")
def host() -> AdapterHost:
    return AdapterHost(ModelSettings(), num_labels=5, seed=0)


def test_spec_lists_the_adapted_projections(host: AdapterHost) -> None:
    spec = host.spec(8)
    assert len(spec.modules) == 12 and all(shape == (384, 384) for shape in spec.modules.values())
    assert spec.scaling == 2.0 and set(spec.head) == {"base_model.model.classifier.weight",
                                                      "base_model.model.classifier.bias"}


def test_state_round_trip_at_several_ranks(host: AdapterHost) -> None:
    spec = host.spec(4)
    for rank in (2, 4):
        state = lm.fresh_state(spec.modules, rank, seed=rank, head=spec.head)
        state = {k: v + 0.01 if "lora_B" in k else v for k, v in state.items()}
        host.load_state(rank, state)
        back = host.get_state(rank)
        assert set(back) == set(state)
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_set_base_is_w0_plus_merge_and_reversible(host: AdapterHost) -> None:
    module = sorted(host.spec(2).modules)[0]
    layer = dict(host.model.named_modules())[module].base_layer
    w0 = layer.weight.detach().clone()
    b, a = torch.randn(384, 3), torch.randn(3, 384)
    host.set_base(1, {module: (b, a)})
    assert torch.allclose(layer.weight, w0 + b @ a, atol=1e-5)
    host.set_base(0, None)
    assert torch.equal(layer.weight, w0)


def test_freezing_a_leaves_only_b_and_head_trainable(host: AdapterHost) -> None:
    host.activate(4)
    params = host.set_trainable(4, train_lora_a=False)
    names = [n for n, p in host.model.named_parameters() if p.requires_grad]
    assert params and all("lora_A" not in n for n in names)
    assert any("lora_B" in n for n in names) and any("classifier" in n for n in names)
    assert all(".r4." in n or n.endswith(".r4.weight") or ".r4" in n for n in names)
