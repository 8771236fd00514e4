"""Sample-level differential privacy (``privacy=dp_sgd``): Opacus wired into local training and accounted per client.

* the calibration and the accounting against Opacus' RDP analysis called directly (its lower-level
  functions, not the accountant object fedlora uses);
* one DP-SGD step against per-example gradients computed one example at a time, clipped and
  summed by hand;
* DP training on the real MiniLM host: FFA-LoRA's frozen ``A`` stays frozen, mixed ranks on one
  host, a repeated round is bitwise the same (what resume relies on), no Opacus hook is left behind;
* the round loop's ledger: every client sent a training message is charged, resume rebuilds the
  counts from ``metrics.jsonl``;
* the configuration: a budget or a noise multiplier, exactly one, refused before anything starts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.config.settings import Settings
from fedlora.config.validate import validate
from fedlora.core.errors import ConfigError
from fedlora.runtime.training import dp as dpsgd
from fedlora.runtime.training.local import Encoded, TrainSettings, train_steps
from fedlora.serving.runtime import DPLedger


def rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Opacus' RDP analysis called directly: compute_rdp over the orders, then the conversion to (eps, delta)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(dpsgd._RDP_ALPHAS)
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders),
                               delta=delta)
    return float(eps)


# -- accounting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,n,batch,steps,rounds", [(8.0, 200, 16, 8, 10), (1.0, 561, 8, 2, 2),
                                                         (4.0, 12, 16, 8, 20)])
def test_each_client_is_calibrated_to_spend_at_most_its_budget_over_the_run(target: float, n: int, batch: int,
                                                                               steps: int, rounds: int) -> None:
    dp = dpsgd.DPSettings(target_epsilon=target, delta=1e-5, rounds=rounds)
    sigma = dpsgd.noise_multiplier(dp, n, batch, steps)
    q = min(1.0, batch / n)
    spent = rdp_epsilon(sigma, q, steps * rounds, 1e-5)
    assert target - 0.02 <= spent <= target  # the least noise that keeps the budget (to the search's tolerance)
    assert dpsgd.epsilon(dp, n, batch, steps, rounds) == pytest.approx(spent, rel=1e-9)
    # a smaller client samples a larger share of its data per step: it needs more noise for the same budget
    assert dpsgd.noise_multiplier(dp, n // 2, batch, steps) >= sigma


def test_epsilon_composes_over_the_rounds_a_client_trained() -> None:
    dp = dpsgd.DPSettings(target_epsilon=None, noise_multiplier=1.1, delta=1e-5, rounds=10)
    spent = [dpsgd.epsilon(dp, 300, 16, 8, r) for r in range(6)]
    assert spent[0] == 0.0
    assert all(a < b for a, b in zip(spent, spent[1:], strict=False))
    assert spent[3] == pytest.approx(rdp_epsilon(1.1, 16 / 300, 24, 1e-5), rel=1e-9)
    # the noise multiplier given is the one used, whatever the client's size
    assert dpsgd.noise_multiplier(dp, 17, 16, 8) == 1.1


def test_other_accountants_are_opacus_own() -> None:
    from opacus.accountants import PRVAccountant

    dp = dpsgd.DPSettings(target_epsilon=None, noise_multiplier=1.0, accountant="prv", rounds=5)
    ref = PRVAccountant()
    ref.history.append((1.0, 16 / 400, 40))
    assert dpsgd.epsilon(dp, 400, 16, 8, 5) == pytest.approx(ref.get_epsilon(delta=dp.delta), rel=1e-6)


def test_poisson_batches_are_seeded_and_sample_at_the_rate() -> None:
    indices = list(range(100, 400))
    one = dpsgd.poisson_batches(indices, 0.05, 200, seed=3)
    assert one == dpsgd.poisson_batches(indices, 0.05, 200, seed=3)
    assert one != dpsgd.poisson_batches(indices, 0.05, 200, seed=4)
    assert all(set(b) <= set(indices) and len(set(b)) == len(b) for b in one)
    sizes = [len(b) for b in one]
    assert abs(sum(sizes) / len(sizes) - 15) < 1.5  # expected batch q * n = 15
    assert len(set(sizes)) > 3  # the size varies, as Poisson sampling does
    assert any(not b for b in dpsgd.poisson_batches(list(range(10)), 0.05, 200, seed=0))  # empty batches happen


def test_the_batch_and_noise_streams_are_independent() -> None:
    from fedlora.core import seeds

    assert len({seeds.dp_stream(7, "noise"), seeds.dp_stream(7, "batches"), seeds.dp_stream(8, "noise"), 7}) == 4


# -- one step against a hand computation ------------------------------------------------------------
def _per_example_reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float,
                           denominator: float) -> list[torch.Tensor]:
    """Each example's gradient by its own backward pass, clipped to ``clip`` jointly over all parameters, summed."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return [t / denominator for t in total]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_one_private_step_clips_each_example_and_adds_noise_of_sigma_clip() -> None:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(7, 6) * 3, torch.randint(0, 3, (7,))
    reference = _per_example_reference(model, x, y, clip=0.1, denominator=4)
    params = list(model.parameters())

    def private_grads(sigma: float, seed: int) -> list[torch.Tensor]:
        wrapped = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
        ps = list(wrapped.parameters())
        opt = dpsgd.PrivateOptimizer(ps, torch.optim.SGD(ps, lr=0.0), sigma=sigma, clip=0.1, expected_batch_size=4,
                                     seed=seed)
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        assert opt.dp.pre_step()
        return [p.grad.detach().clone() for p in ps]

    exact = private_grads(0.0, 0)
    for got, want in zip(exact, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    noisy = private_grads(50.0, 1)
    noise = torch.cat([(g - r).flatten() for g, r in zip(noisy, reference, strict=True)])
    assert noise.std().item() == pytest.approx(50.0 * 0.1 / 4, rel=0.35)  # sigma * C / expected batch, 53 draws
    assert private_grads(50.0, 1)[0].equal(noisy[0])  # seeded noise
    assert len(params) == 4


# -- DP training on the real model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def host() -> Any:
    from fedlora.runtime.models import AdapterHost, ModelSettings

    return AdapterHost(ModelSettings(), num_labels=5, seed=0)


def _data(n: int = 40) -> Encoded:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (n, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[::3, 16:] = 0
    return Encoded(ids, mask, torch.randint(0, 5, (n,), generator=gen))


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_dp_training_on_the_host_keeps_a_frozen_a_serves_mixed_ranks_and_repeats_bitwise(host: Any) -> None:
    dp = dpsgd.DPSettings(target_epsilon=4.0, rounds=3)
    settings = TrainSettings(local_steps=3, batch_size=8, lr=1e-2, dp=dp)
    data, hooks = _data(), _hooks(host.model)

    def round_of(rank: int, train_a: bool) -> dict[str, torch.Tensor]:
        host.activate(rank)
        start = {k: torch.full_like(v, 0.01) for k, v in host.get_state(rank).items()}
        host.load_state(rank, start)
        params = host.set_trainable(rank, train_a)
        loss = train_steps(host.model, params, data, list(range(40)), settings, seed=11)
        assert loss == loss  # finite: some batch was drawn
        return {k: v - start[k] for k, v in host.get_state(rank).items()}

    ffa = round_of(2, train_a=False)
    assert all(not v.any() for k, v in ffa.items() if "lora_A" in k)  # FFA-LoRA: A frozen, and not noised
    assert all(v.any() for k, v in ffa.items() if "lora_B" in k or "classifier" in k)
    full = round_of(4, train_a=True)  # another rank on the same host
    assert all(v.any() for v in full.values())
    again = round_of(4, train_a=True)
    assert all(torch.equal(full[k], again[k]) for k in full)  # a rerun (a resumed round) draws the same
    assert _hooks(host.model) == hooks
    assert not any(hasattr(p, "grad_sample") for p in host.model.parameters())
    plain = train_steps(host.model, host.set_trainable(4, True), data, list(range(40)),
                        TrainSettings(local_steps=3, batch_size=8, lr=1e-2), seed=11)
    assert plain == plain  # the host still trains without privacy afterwards


# -- the server's ledger ----------------------------------------------------------------------------
def test_the_loop_charges_every_sampled_client_and_resume_rebuilds_the_counts(tmp_path: Path) -> None:
    from federation_kit import TinyModel, TinyTrainer

    from fedlora.federation.client import ClientSide
    from fedlora.federation.loop import Federation, LoopSettings
    from fedlora.federation.memory import InMemoryTransport
    from fedlora.results.record import read_records
    from fedlora.results.recorder import RunRecorder
    from strategies.fedavg import FedAvg

    ledger = DPLedger(TrainSettings(local_steps=4, batch_size=8,
                                    dp=dpsgd.DPSettings(target_epsilon=3.0, rounds=4)))

    def run(run_dir: Path, rounds: int, resume: bool = False) -> tuple[dict, list[str]]:
        trainer = TinyTrainer(examples=(30, 60, 90, 120))
        transport = InMemoryTransport(dict(enumerate([2, 4, 2, 8])), ClientSide(trainer=trainer))
        lines: list[str] = []
        settings = LoopSettings(name="t", seed=1, num_clients=4, num_rounds=rounds, fraction_train=0.5,
                                round_timeout=30.0, resume=resume)
        fed = Federation(settings, strategy=FedAvg(), transport=transport, model=TinyModel(run_dir), run_dir=run_dir,
                         recorder=RunRecorder(run_dir, tensorboard=False), say=lines.append, privacy=ledger)
        return fed.run(), lines

    summary, lines = run(tmp_path / "straight", 4)
    assert "DP-SGD (Opacus, rdp accountant)" in lines[0] and "epsilon 3 over 4 rounds" in lines[0]
    records = read_records(tmp_path / "straight")
    counts: dict[int, int] = {}
    for record in records[1:]:
        for row in record.clients:
            counts[row.client] = counts.get(row.client, 0) + 1
            assert row.epsilon == ledger.epsilon([30, 60, 90, 120][row.client], counts[row.client])
        assert record.dp_epsilon == max(ledger.epsilon([30, 60, 90, 120][c], n) for c, n in counts.items())
    assert max(counts.values()) < 4 and summary["dp_epsilon"] == records[-1].dp_epsilon <= 3.0
    assert summary["dp_delta"] == 1e-5
    killed = tmp_path / "killed"
    run(killed, 2)
    run(killed, 4, resume=True)
    assert [(r.dp_epsilon, [c.epsilon for c in r.clients]) for r in read_records(killed)] == \
        [(r.dp_epsilon, [c.epsilon for c in r.clients]) for r in records]


# -- configuration ----------------------------------------------------------------------------------
def _problems(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides), check_model=False, check_data=False)
    return str(info.value)


def test_privacy_needs_exactly_one_of_a_budget_and_a_noise_multiplier() -> None:
    both = _problems(["privacy=dp_sgd", "privacy.noise_multiplier=1.0"])
    assert "privacy.target_epsilon=8.0" in both and "set exactly one of the two" in both
    assert "set exactly one" in _problems(["privacy=dp_sgd", "privacy.target_epsilon=null"])
    validate(compose(["privacy=dp_sgd", "privacy.target_epsilon=null", "privacy.noise_multiplier=0.8"]),
             check_model=False, check_data=False)


def test_gradient_checkpointing_is_refused_with_dp_sgd() -> None:
    text = _problems(["privacy=dp_sgd", "+model.gradient_checkpointing=true"])
    assert "model.gradient_checkpointing=True" in text and "per-example gradients" in text


def test_settings_carry_the_budget_over_the_runs_rounds() -> None:
    settings = Settings.from_config(compose(["privacy=dp_sgd", "num_rounds=7", "privacy.clip=0.5"]))
    assert settings.train.dp == dpsgd.DPSettings(clip=0.5, delta=1e-5, target_epsilon=8.0, rounds=7)
    assert Settings.from_config(compose([])).train.dp is None


# -- client-level DP (DP-FedAvg) --------------------------------------------------------------------
def test_private_mean_clips_each_change_sums_and_divides_by_the_fixed_denominator() -> None:
    from fedlora.core.privacy import ClientLevel, private_mean

    g = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([0.0])}
    images = [{"x": torch.tensor([4.0, 5.0]), "y": torch.tensor([0.0])},  # change (3, 4): norm 5, clipped to 1
              {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([0.5])}]  # change 0.5: kept
    level = ClientLevel(clip=1.0, noise_multiplier=0.0, denominator=4)
    out, metrics = private_mean(g, images, {"x", "y"}, level, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["x"], torch.tensor([1.0 + 0.6 / 4, 1.0 + 0.8 / 4]))
    torch.testing.assert_close(out["y"], torch.tensor([0.5 / 4]))
    assert metrics == {"dp_clipped_fraction": 0.5, "dp_update_norm_median": 0.5, "dp_noise_std": 0.0}
    big = {"x": torch.zeros(20000), "y": torch.zeros(3)}
    noisy, m = private_mean(big, [big, big], {"x"}, ClientLevel(0.5, 2.0, 5), torch.Generator().manual_seed(1))
    assert noisy["x"].std().item() == pytest.approx(2.0 * 0.5 / 5, rel=0.03) and m["dp_noise_std"] == 0.2
    assert not noisy["y"].any()  # a tensor no client may move gets no noise
    with pytest.raises(ValueError, match="released without noise"):
        private_mean(big, [{"x": big["x"], "y": torch.ones(3)}], {"x"}, ClientLevel(0.5, 2.0, 5),
                     torch.Generator().manual_seed(1))


def _padded_image(state: dict[str, torch.Tensor], r_max: int) -> dict[str, torch.Tensor]:
    """FedAvg's image of one client's update: its factors zero-padded to ``r_max`` (A rows, B columns)."""
    from fedlora.core import lora_math as lm
    from fedlora.core.secure import padded_shape

    return {k: lm.pad_key(k, v, padded_shape(k, tuple(v.shape), r_max)) for k, v in state.items()}


@settings(max_examples=60, deadline=None)
@given(ranks=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=6),
       scales=st.lists(st.floats(1e-3, 1e3), min_size=6, max_size=6),
       clip=st.floats(1e-2, 10.0), seed=st.integers(0, 2**16))
def test_clipping_bounds_every_clients_contribution_whatever_its_rank_and_size(
        ranks: list[int], scales: list[float], clip: float, seed: int) -> None:
    # DP-FedAvg's sensitivity: with the noise off, m (g' - g) is the sum of the clipped changes, each of
    # norm <= C, and leaving any one client out moves that sum by at most C (add/remove adjacency)
    from fedlora.core.privacy import ClientLevel, private_mean

    gen = torch.Generator().manual_seed(seed)
    r_max, m, n = max(ranks), 5, 3
    keys = {"base_model.model.q.lora_A.weight": lambda r: (r, n), "base_model.model.q.lora_B.weight": lambda r: (m, r),
            "classifier.weight": lambda r: (4, m)}
    # g of the clip's size: the released adapter is float32, and g + sum / m - g loses eps32 |g| per entry
    g = {k: clip * torch.randn(shape(r_max), generator=gen) for k, shape in keys.items()}
    images = [_padded_image({k: scales[i] * torch.randn(shape(r), generator=gen) for k, shape in keys.items()}, r_max)
              for i, r in enumerate(ranks)]
    level = ClientLevel(clip=clip, noise_multiplier=0.0, denominator=len(ranks) + 1)

    def released_sum(chosen: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        out, _ = private_mean(g, chosen, set(keys), level, torch.Generator().manual_seed(0))
        return torch.cat([(out[k].double() - g[k].double()).reshape(-1) for k in sorted(keys)]) * level.denominator

    total = released_sum(images)
    contributions = [released_sum([image]) for image in images]
    assert all(float(c.norm()) <= clip * (1 + 1e-5) for c in contributions)
    torch.testing.assert_close(total, torch.stack(contributions).sum(0), rtol=1e-5, atol=1e-5 * clip * len(images))
    for j in range(len(images)):
        without = released_sum(images[:j] + images[j + 1:]) if len(images) > 1 else torch.zeros_like(total)
        assert float((total - without).norm()) <= clip * (1 + 1e-4) + 1e-5


def test_a_client_under_secure_aggregation_masks_the_change_the_server_would_have_clipped() -> None:
    # client-level DP with a masked sum: the client's vector is clip(pad(update) - reference), exactly the
    # server's clip of its image in the plain path (fedlora.core.privacy.private_mean)
    from fedlora.core import secure
    from fedlora.core.privacy import ClientLevel, clip_update, private_mean
    from fedlora.core.types import ClientPlan
    from fedlora.federation import wire
    from fedlora.federation.client import secure_vector

    gen = torch.Generator().manual_seed(3)
    ka, kb = "base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"
    g = {ka: torch.randn(8, 3, generator=gen), kb: torch.randn(5, 8, generator=gen)}
    update = {ka: 4 * torch.randn(2, 3, generator=gen), kb: 4 * torch.randn(5, 2, generator=gen)}
    plan_k = ClientPlan(rank=2, adapter=g, init_seed=0)
    assignment = wire.Assignment(1, plan_k, {}, clip_reference=g, clip=0.7, secure_weight=64)
    vector = secure_vector(update, 8, assignment)
    plan = secure.layout({k: tuple(v.shape) for k, v in update.items()}, 8)
    expected, norm = clip_update({k: v - g[k] for k, v in _padded_image(update, 8).items()}, 0.7)
    assert norm > 0.7
    torch.testing.assert_close(secure.unembed(vector, plan), expected)
    assert float(vector.norm()) == pytest.approx(0.7, rel=1e-6)
    plain, _ = private_mean(g, [_padded_image(update, 8)], {ka, kb}, ClientLevel(0.7, 0.0, 1),
                            torch.Generator().manual_seed(0))
    torch.testing.assert_close(secure.unembed(vector, plan), {k: plain[k] - g[k] for k in g})
    with pytest.raises(RuntimeError, match="reference holds"):
        secure_vector(update, 8, wire.Assignment(1, plan_k, {}, clip_reference={ka: g[ka]}, clip=0.7))
    with pytest.raises(RuntimeError, match="with clip 0.0"):  # a reference without a clip would zero the vector
        secure_vector(update, 8, wire.Assignment(1, plan_k, {}, clip_reference=g))


def test_client_epsilon_is_the_sampled_gaussian_over_the_rounds() -> None:
    dp = dpsgd.ClientDPSettings(noise_multiplier=1.2, sample_rate=0.1, rounds=50)
    assert dpsgd.client_epsilon(dp, 0) == 0.0
    assert dpsgd.client_epsilon(dp, 30) == pytest.approx(rdp_epsilon(1.2, 0.1, 30, 1e-5), rel=1e-9)
    calibrated = dpsgd.ClientDPSettings(noise_multiplier=None, target_epsilon=3.0, sample_rate=0.1, rounds=50)
    assert 2.98 <= dpsgd.client_epsilon(calibrated, 50) <= 3.0


def _client_dp_run(run_dir: Path, rounds: int, z: float, clip: float, resume: bool = False,
                   strategy: Any = None) -> tuple[dict, list[str]]:
    from federation_kit import TinyModel, TinyTrainer

    from fedlora.federation.client import ClientSide
    from fedlora.federation.loop import Federation, LoopSettings
    from fedlora.federation.memory import InMemoryTransport
    from fedlora.results.recorder import RunRecorder
    from fedlora.serving.runtime import ClientDPLedger
    from strategies.fedavg import FedAvg

    ledger = None if z < 0 else ClientDPLedger(dpsgd.ClientDPSettings(noise_multiplier=z, clip=clip, rounds=4), 3)
    transport = InMemoryTransport({0: 2, 1: 4, 2: 8}, ClientSide(trainer=TinyTrainer(examples=(30,))))
    lines: list[str] = []
    settings = LoopSettings(name="t", seed=2, num_clients=3, num_rounds=rounds, round_timeout=30.0, resume=resume)
    fed = Federation(settings, strategy=strategy or FedAvg(), transport=transport, model=TinyModel(run_dir),
                     run_dir=run_dir, recorder=RunRecorder(run_dir, tensorboard=False), say=lines.append,
                     client_dp=ledger)
    return fed.run(), lines


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # z = 0: epsilon is infinite
def test_without_noise_or_clipping_dp_fedavg_is_fedavg_and_with_noise_it_resumes_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fedlora.results.record import read_records

    def saved(run_dir: Path) -> dict[str, torch.Tensor]:
        return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))

    _client_dp_run(tmp_path / "plain", 3, z=-1, clip=1.0)
    summary, lines = _client_dp_run(tmp_path / "open", 3, z=0.0, clip=1e9)  # equal sizes: FedAvg's weights are 1/3
    assert "client-level DP (DP-FedAvg)" in lines[0] and "max_norm_ratio=10 is not applied" in lines[0]
    for key, value in saved(tmp_path / "plain").items():
        torch.testing.assert_close(saved(tmp_path / "open")[key], value, rtol=1e-5, atol=1e-6)
    assert summary["dp_level"] == "client" and summary["dp_epsilon"] == math.inf  # no noise, no privacy

    _client_dp_run(tmp_path / "straight", 4, z=0.8, clip=0.5)
    killed = tmp_path / "killed"
    _client_dp_run(killed, 2, z=0.8, clip=0.5)
    _client_dp_run(killed, 4, z=0.8, clip=0.5, resume=True)
    assert all(torch.equal(saved(killed)[k], v) for k, v in saved(tmp_path / "straight").items())
    straight = read_records(tmp_path / "straight")
    assert [r.strategy for r in read_records(killed)] == [r.strategy for r in straight]
    assert all(r.strategy["dp_clipped_fraction"] == 1.0 for r in straight[1:])  # TinyTrainer moves far more than 0.5
    assert [r.dp_epsilon for r in straight[1:]] == [dpsgd.client_epsilon(
        dpsgd.ClientDPSettings(noise_multiplier=0.8, clip=0.5, rounds=4), t) for t in (1, 2, 3, 4)]


def test_ffa_lora_under_client_level_dp_never_noises_its_frozen_a(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fedlora.core import lora_math as lm
    from strategies.ffa_lora import FFALoRA

    _client_dp_run(tmp_path, 3, z=1.0, clip=0.5, strategy=FFALoRA())
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    from federation_kit import MODULES

    for module, (_, n) in MODULES.items():
        assert torch.equal(weights[lm.lora_a_key(module)], lm.init_lora_a(2, module, 8, n))


def _privacy_variants() -> list[list[str]]:
    from conftest import PRIVACY_OPTIONS, privacy_extra, privacy_strategies

    return [[f"strategy={n}", *privacy_extra(n)] for n in privacy_strategies()] + PRIVACY_OPTIONS


@pytest.mark.parametrize("mode", ["privacy=dp_sgd", "privacy=dp_fedavg", "privacy=secagg",
                                  "privacy=dp_sgd privacy.secure=true", "privacy=dp_fedavg privacy.secure=true"])
def test_every_refused_method_and_privacy_mode_is_refused_before_ray_with_its_reason_and_fix(mode: str) -> None:
    # the other side of tests/integration/test_secure_aggregation.py (every pair let through runs end to end):
    # each refusal names the privacy or strategy field, the method where the reason is the method's, and a fix
    refused = 0
    for variant in _privacy_variants():
        try:
            validate(compose([*variant, *mode.split()]), check_model=False, check_data=False)
        except ConfigError as exc:
            refused += 1
            text = str(exc)
            assert "privacy." in text or "strategy." in text, (variant, text)
            assert any(fix in text.lower() for fix in ("use ", "set ", "turn ")), (variant, text)
    # DP-SGD: HetLoRA's pruning; DP-FedAvg: FLoRA (x2, with downlink=svd), LoRA-FAIR, FlexLoRA, FedEx-LoRA, FedSA-LoRA,
    # HetLoRA (x2), norm weights, owners' padding, the bound; secure: all but plain FedAvg, FFA-LoRA and RoLoRA
    assert refused == {"privacy=dp_sgd": 1, "privacy=dp_fedavg": 11}.get(mode, 14), refused


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora", "rolora", "flora", "lora_fair", "flexlora", "fedex_lora"])
def test_dp_fedavg_runs_exactly_the_strategies_that_declare_linearity(strategy: str) -> None:
    cfg = compose(["privacy=dp_fedavg", f"strategy={strategy}"])
    linear = strategy in ("fedavg", "ffa_lora", "rolora")
    if linear:
        validate(cfg, check_model=False, check_data=False)
    else:
        text = _problems(["privacy=dp_fedavg", f"strategy={strategy}"])
        assert "privacy.kind='dp_fedavg'" in text and "not linear in what clients send" in text
    validate(compose(["privacy=dp_sgd", f"strategy={strategy}"]), check_model=False, check_data=False)


def test_an_infinite_budget_is_the_non_private_baseline_of_a_sweep() -> None:
    from fedlora.results.report import method_label

    for kind in ("dp_sgd", "dp_fedavg"):
        cfg = compose(["experiment=privacy", f"privacy={kind}", "privacy.target_epsilon=inf",
                       "privacy.noise_multiplier=null"])
        validate(cfg, check_model=False, check_data=False)
        settings = Settings.from_config(cfg)
        assert settings.train.dp is None and settings.client_dp is None
        assert method_label(cfg) == ("fedavg", "fedavg")
    private = compose(["experiment=privacy", "privacy.target_epsilon=3", "strategy=ffa_lora"])
    assert method_label(private) == ("ffa_lora", "ffa_lora+dp_sgd(eps=3)")
    client = compose(["privacy=dp_fedavg", "privacy.clip=0.5"])
    assert method_label(client) == ("fedavg", "fedavg+dp_fedavg(z=1,C=0.5)")
    assert "privacy.target_epsilon=-inf" in _problems(["privacy=dp_sgd", "privacy.target_epsilon=-inf"])


def test_a_causal_lms_examples_are_clipped_on_their_own_tokens() -> None:
    # DP-SGD on the tiny decoder: per-example losses (each over its own target tokens), equal to the model's
    # own loss when every example has the same number of targets; training runs and moves only LoRA factors
    from fedlora.runtime.models import AdapterHost, ModelSettings
    from fedlora.runtime.training.sft import IGNORE, SFTEncoded

    host = AdapterHost(ModelSettings(name="tiny-random-llama", target_modules=("q_proj", "v_proj"), decoder=True,
                                     dropout=0.0), 0, seed=0)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(12):
        ids = torch.randint(5, 200, (10 + i % 3,), generator=gen).tolist()
        examples.append((ids, [IGNORE] * 4 + ids[4:]))
    data = SFTEncoded.from_examples(examples, pad_id=0)
    host.activate(2)
    host.model.eval()
    same = data.batch([0, 3, 6])  # equal lengths: token mean == mean of per-example means
    with torch.no_grad():
        torch.testing.assert_close(dpsgd.per_example_mean_loss(host.model, same), host.model(**same).loss)
        mixed = data.batch([0, 1, 2])
        by_hand = torch.stack([dpsgd.per_example_mean_loss(host.model, data.batch([i])) for i in (0, 1, 2)]).mean()
        torch.testing.assert_close(dpsgd.per_example_mean_loss(host.model, mixed), by_hand)
    start = host.get_state(2)
    settings = TrainSettings(local_steps=3, batch_size=4, lr=1e-2,
                             dp=dpsgd.DPSettings(target_epsilon=None, noise_multiplier=0.5, rounds=1))
    loss = train_steps(host.model, host.set_trainable(2, True), data, list(range(12)), settings, seed=1)
    assert math.isfinite(loss)
    after = host.get_state(2)
    assert all(not torch.equal(after[k], start[k]) for k in start)


# -- secure aggregation: what it refuses before Ray starts ----------------------------------------------


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora", "rolora", "flora", "lora_fair", "flexlora", "fedex_lora"])
def test_secure_aggregation_runs_exactly_the_strategies_that_declare_linearity(strategy: str) -> None:
    overrides = ["privacy=secagg", f"strategy={strategy}"]
    if strategy in ("fedavg", "ffa_lora", "rolora"):
        validate(compose(overrides), check_model=False, check_data=False)
        validate(compose([*overrides[1:], "privacy=dp_sgd", "privacy.secure=true"]), check_model=False,
                 check_data=False)
        validate(compose([*overrides[1:], "privacy=dp_fedavg", "privacy.secure=true"]), check_model=False,
                 check_data=False)
    else:
        text = _problems(overrides)
        assert "privacy.secure=True" in text and "not linear in what clients send" in text


@pytest.mark.parametrize(("overrides", "named", "fix"), [
    (["compression=compeft"], "compression='compeft'", "use compression=none"),
    (["compression=ef21"], "compression='ef21'", "use compression=none"),
    (["strategy=fedavg", "strategy.padding=owners"], "privacy.secure=True", "use padding=zero"),
    (["strategy=fedavg", "strategy.weighting=norm"], "privacy.secure=True", "HetLoRA's norm weights"),
    (["secure_aggregation.num_shares=4"], "secure_aggregation.num_shares=4", "use an odd number, e.g. 5"),
    (["secure_aggregation.threshold=7", "secure_aggregation.num_shares=5"], "secure_aggregation.threshold=7",
     "<= secure_aggregation.num_shares=5"),
    (["num_clients=2"], "secure_aggregation.threshold=3", "a round samples 2 client(s)"),
    (["secure_aggregation.modulus_range=8388608"], "secure_aggregation.modulus_range=8388608",
     "would wrap around the modulus"),
    (["secure_aggregation.quantization_range=4294967296", "secure_aggregation.modulus_range=1099511627776"],
     "secure_aggregation.quantization_range=4294967296", "below 2**31"),
    (["secure_aggregation.clipping_range=0"], "secure_aggregation.clipping_range=0", "use a number > 0"),
    (["secure_aggregation.threshold=1"], "secure_aggregation.threshold=1", "an integer >= 2"),
    (["strategy=centralized"], "privacy.secure=True", "nothing to sum"),
])
def test_secure_aggregation_refuses_what_it_cannot_sum_naming_the_field_and_the_fix(
        overrides: list[str], named: str, fix: str) -> None:
    text = _problems(["privacy=secagg", *overrides])
    assert named in text and fix in text, text
