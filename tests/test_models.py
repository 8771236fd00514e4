"""The per-process model host: one base, one adapter per rank, exact base merges."""

from __future__ import annotations

import pytest
import torch

from fedlora.core import lora_math as lm
from fedlora.core.types import LoraPair
from fedlora.runtime.models import AdapterHost, ModelSettings


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
    host.set_base(1, {module: LoraPair(a, b)})
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


def test_freezing_b_leaves_only_a_and_head_trainable(host: AdapterHost) -> None:
    host.activate(4)
    params = host.set_trainable(4, train_lora_a=True, train_lora_b=False)
    names = [n for n, p in host.model.named_parameters() if p.requires_grad]
    assert params and all("lora_B" not in n for n in names)
    assert any("lora_A" in n for n in names) and any("classifier" in n for n in names)


# -- decoders (task=causal_lm) -----------------------------------------------------------------------
DECODER = ModelSettings(name="tiny-random-llama", target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                        decoder=True, dropout=0.0)


def test_tiny_decoder_is_the_same_in_every_process_and_has_no_head() -> None:
    one, two = AdapterHost(DECODER, 0, seed=0), AdapterHost(DECODER, 0, seed=7)  # the run seed is irrelevant
    sd1, sd2 = one.model.state_dict(), two.model.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1 if "lora" not in k)
    spec = one.spec(4)
    assert spec.head == {} and len(spec.modules) == 8 and set(spec.modules.values()) == {(64, 64)}
    state = lm.fresh_state(spec.modules, 4, seed=1, head={})
    one.load_state(4, state)
    assert set(one.get_state(4)) == set(state)  # LoRA factors only


def test_bf16_base_keeps_merges_factored_and_exact() -> None:
    # A bf16 weight would round most of a small merge away; the host keeps B A in fp32 beside it.
    host = AdapterHost(ModelSettings(**{**DECODER.__dict__, "dtype": "bfloat16"}), 0, seed=0)
    module = sorted(host.spec(2).modules)[0]
    layer = dict(host.model.named_modules())[module].base_layer
    assert layer.weight.dtype == torch.bfloat16 and host._w0 == {}
    assert all(p.dtype == torch.float32 for n, p in host.model.named_parameters() if "lora_" in n)
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(64, 3, generator=g), torch.randn(3, 64, generator=g)
    small = 1e-3 * b  # a typical round's merge: ~1e-3 per weight
    rounded = (layer.weight.float() + small @ a).to(torch.bfloat16)  # what writing the merge would keep
    kept = (rounded.float() - layer.weight.float()).flatten()
    lost = torch.linalg.vector_norm(kept - (small @ a).flatten()) / torch.linalg.vector_norm(small @ a)
    assert float(lost) > 0.1
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    plain = layer(x).float()
    host.set_base(1, {module: LoraPair(a, 1e-2 * b)})
    merged = layer(x).float()
    assert layer.weight.dtype == torch.bfloat16  # the weight itself is never written
    expected = x.float() @ (1e-2 * b @ a).T
    # only the bf16 rounding of the outputs (~1e-2 here) separates the two
    assert float((merged - plain - expected).abs().max()) < 0.05 * float(expected.abs().max())
    host.set_base(0, None)
    assert torch.equal(layer(x).float(), plain)


def test_decoder_dtype_and_checkpointing_follow_the_device() -> None:
    from fedlora.runtime.models import resolve_dtype, use_gradient_checkpointing

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(DECODER, cpu) == torch.float32
    assert not use_gradient_checkpointing(DECODER, cpu)
    auto = ModelSettings(**{**DECODER.__dict__, "dtype": "auto", "gradient_checkpointing": "auto"})
    assert resolve_dtype(auto, cpu) == torch.float32 and not use_gradient_checkpointing(auto, cpu)
    assert use_gradient_checkpointing(auto, gpu)
    forced = ModelSettings(**{**DECODER.__dict__, "gradient_checkpointing": True})
    host = AdapterHost(forced, 0, seed=0)
    assert host.model.base_model.model.is_activation_checkpointing


def test_gradient_checkpointing_trains_identically() -> None:
    # the GPU default (gradient_checkpointing=auto) must change memory only, never the result
    from fedlora.runtime.tiny_decoder import build_tiny_tokenizer
    from fedlora.runtime.training import sft
    from fedlora.runtime.training.local import TrainSettings, train_steps

    tok = build_tiny_tokenizer()
    data = sft.SFTEncoded.from_examples(
        [sft.encode_example(tok, f"prompt {i}", f"answer {7 * i}", 64)[:2] for i in range(32)],
        tok.pad_token_id)
    trained = []
    for checkpointing in (False, True):
        settings = ModelSettings(**{**DECODER.__dict__, "gradient_checkpointing": checkpointing})
        host = AdapterHost(settings, 0, 0)
        host.load_state(4, lm.fresh_state(host.spec(4).modules, 4, seed=1, head={}))
        loss = train_steps(host.model, host.set_trainable(4, True), data, list(range(32)),
                           TrainSettings(local_steps=3, batch_size=8, lr=1e-2), seed=3)
        trained.append((loss, host.get_state(4)))
    (loss0, state0), (loss1, state1) = trained
    assert loss0 == loss1 and all(torch.equal(state0[k], state1[k]) for k in state0)
    assert any(float(v.abs().max()) > 0 for k, v in state1.items() if "lora_B" in k)
