"""The Strategy contract, checked for every strategy that conf/strategy/*.yaml names (algorithms.md §8.11).

Each YAML is loaded with plain PyYAML and its ``_target_`` imported with importlib (no Hydra), so a
new strategy config is covered automatically. Clients are simulated from each strategy's own plan:
a fresh adapter when ``plan.adapter`` is None, ``A`` (``B``) left alone when ``train_lora_a``
(``train_lora_b``) is False; under a personal plan (FedSA-LoRA) the server sees only the trained ``A``:
the ``B`` and head it holds are its own start (those tensors never leave the client).

The comparisons use the *effective* update of a round, which every strategy defines the same way:
``merge product + s * B_new @ A_new``, i.e. the change a client's trained model made relative to the
base it trained on. For FedAvg-like strategies ``merge`` is None; for FLoRA the adapter has ``B = 0``
and everything is in the merge.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterSpec, AggregateResult, ClientPlan, ClientUpdate, Strategy

ROOT = Path(__file__).resolve().parents[2]
S = 2.0
SEED = 5
MODULES = {"enc.q": (8, 6), "enc.v": (5, 7)}  # non-square, m != n
HEAD = {"classifier.weight": torch.zeros(3, 6), "classifier.bias": torch.zeros(3)}


def target_class(node: dict):
    module, _, attr = node["_target_"].rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _configs():
    out = []
    for path in sorted((ROOT / "conf" / "strategy").glob("*.yaml")):
        node = yaml.safe_load(path.read_text()) or {}
        if node.get("_target_"):
            out.append(pytest.param(node, id=path.stem))
    return out


ALL_CONFIGS = _configs()
# `pooled = True` marks a non-federated baseline (one learner on the pooled data, e.g.
# strategies.centralized): it takes exactly one update per round, so the multi-client
# aggregation contract does not apply to it.
CONFIGS = [p for p in ALL_CONFIGS if not getattr(target_class(p.values[0]), "pooled", False)]


def build(node: dict):
    return target_class(node)(**{k: v for k, v in node.items() if k != "_target_"})


def spec(r_max: int) -> AdapterSpec:
    return AdapterSpec(MODULES, r_max, S, {k: v.clone() for k, v in HEAD.items()})


def start_state(plan: ClientPlan) -> dict:
    if plan.adapter is not None:
        return {k: v.clone() for k, v in plan.adapter.items()}
    return lm.fresh_state(MODULES, plan.rank, plan.init_seed, plan.head)


def train(plan: ClientPlan, gen: torch.Generator, step: float = 0.3) -> dict:
    """A stand-in for local training that respects the plan (as the server sees its result)."""
    state = start_state(plan)
    for key in sorted(state):
        if plan.personal and lm.is_personal_key(key):
            continue
        if key.endswith(".lora_A.weight") and not plan.train_lora_a:
            continue
        if key.endswith(".lora_B.weight") and not plan.train_lora_b:
            continue
        state[key] = state[key] + step * torch.randn(state[key].shape, generator=gen)
    return state


def round_one(strategy, ranks, counts, seed=0, r_max=None, server_round=1):
    r_max = r_max or max(ranks)
    init = strategy.init(spec(r_max), SEED)
    gen = torch.Generator().manual_seed(seed)
    updates, plans = [], []
    for cid, (r, n_k) in enumerate(zip(ranks, counts, strict=False)):
        plan = strategy.plan(init.adapter, init.state, client_id=cid, rank=r, server_round=server_round, seed=SEED)
        plans.append(plan)
        updates.append(ClientUpdate(cid, r, S, n_k, train(plan, gen)))
    return init, plans, updates


def effective(result: AggregateResult, module: str) -> torch.Tensor:
    """Dense (m, n) change of the global model this round: merge + s B A (float64)."""
    a = result.adapter[lm.lora_a_key(module)].double()
    b = result.adapter[lm.lora_b_key(module)].double()
    out = S * (b @ a)
    if result.merge is not None and module in result.merge:
        a_m, b_m = result.merge[module]
        out = out + b_m.double() @ a_m.double()
    return out


def client_effective(update: ClientUpdate, module: str) -> torch.Tensor:
    a = update.state[lm.lora_a_key(module)].double()
    b = update.state[lm.lora_b_key(module)].double()
    return S * (b @ a)


def assert_same_effect(r1: AggregateResult, r2: AggregateResult, atol=1e-5):
    for module in MODULES:
        assert torch.allclose(effective(r1, module), effective(r2, module), atol=atol)
    assert r1.adapter.keys() == r2.adapter.keys()
    for key in r1.adapter:
        if lm.is_lora_key(key) and r1.merge is not None:
            continue  # fresh factors: compared through the effective update
        assert torch.allclose(r1.adapter[key].double(), r2.adapter[key].double(), atol=atol), key


# -- protocol and shapes ---------------------------------------------------------------------------------


def test_configs_found():
    names = {p.id for p in CONFIGS}
    assert {"fedavg", "flora", "ffa_lora", "lora_fair"} <= names


@pytest.mark.parametrize("node", ALL_CONFIGS)
def test_is_a_strategy(node):
    strategy = build(node)
    assert isinstance(strategy, Strategy)


@pytest.mark.parametrize("node", ALL_CONFIGS)
def test_init_and_plan_shapes(node):
    strategy = build(node)
    init = strategy.init(spec(8), SEED)
    assert isinstance(init, AggregateResult)
    assert set(init.adapter) == {lm.lora_a_key(m) for m in MODULES} | {
        lm.lora_b_key(m) for m in MODULES
    } | set(HEAD)
    assert lm.rank_of(init.adapter) == 8
    assert all(isinstance(v, torch.Tensor) for v in init.state.values())
    for rank in (1, 3, 8):
        plan = strategy.plan(init.adapter, init.state, client_id=2, rank=rank, server_round=1, seed=SEED)
        assert isinstance(plan, ClientPlan) and plan.rank == rank
        start = start_state(plan)
        assert start.keys() == init.adapter.keys()
        assert lm.rank_of(start) == rank
        for module, (m, n) in MODULES.items():
            assert start[lm.lora_a_key(module)].shape == (rank, n)
            assert start[lm.lora_b_key(module)].shape == (m, rank)
        if not plan.send_lora_a:  # A must then be a pure function of the seed
            for module, (_, n) in MODULES.items():
                assert torch.equal(
                    start[lm.lora_a_key(module)], lm.init_lora_a(plan.init_seed, module, rank, n)
                )


@pytest.mark.parametrize("node", CONFIGS)
def test_output_keys_shapes_dtypes_preserved_and_finite(node):
    strategy = build(node)
    init, _, updates = round_one(strategy, [8, 4, 2], [10, 20, 30])
    res = strategy.aggregate(init.adapter, init.state, updates, server_round=1)
    assert res.adapter.keys() == init.adapter.keys()
    for key, value in init.adapter.items():
        assert res.adapter[key].shape == value.shape, key
        assert res.adapter[key].dtype == value.dtype, key
        assert torch.isfinite(res.adapter[key]).all(), key
    assert all(isinstance(v, torch.Tensor) for v in res.state.values())
    assert all(isinstance(v, float) and math.isfinite(v) for v in res.metrics.values())
    if res.merge is not None:
        assert set(res.merge) <= set(MODULES)
        for module, (a, b) in res.merge.items():
            m, n = MODULES[module]
            assert b.shape[0] == m and a.shape[1] == n and b.shape[1] == a.shape[0]  # (m, R) @ (R, n)
            assert torch.isfinite(b).all() and torch.isfinite(a).all()
    # the next round plans from the result
    plan = strategy.plan(res.adapter, res.state, client_id=0, rank=4, server_round=2, seed=SEED)
    assert lm.rank_of(start_state(plan)) == 4


# -- algebraic invariants -------------------------------------------------------------------------------


@pytest.mark.parametrize("node", ALL_CONFIGS)
def test_single_client_returns_itself(node):
    # one client in -> that client out (FLoRA: p_1 = 1, merge product = s B A of the client)
    strategy = build(node)
    for rank in (8, 3):  # global r_max is 8, so rank 3 exercises padding / truncation
        init, _, updates = round_one(strategy, [rank], [17], r_max=8)
        res = strategy.aggregate(init.adapter, init.state, updates, server_round=1)
        for module in MODULES:
            assert torch.allclose(effective(res, module), client_effective(updates[0], module), atol=1e-5)
        for key in HEAD:
            assert torch.allclose(res.adapter[key], updates[0].state[key], atol=1e-6)


@pytest.mark.parametrize("node", CONFIGS)
def test_identical_clients_give_that_client(node):
    strategy = build(node)
    init, _, updates = round_one(strategy, [4, 4, 4], [1, 5, 9])
    same = [
        ClientUpdate(
            u.client_id, u.rank, S, u.num_examples, {k: v.clone() for k, v in updates[0].state.items()}
        )
        for u in updates
    ]
    res = strategy.aggregate(init.adapter, init.state, same, server_round=1)
    for module in MODULES:
        assert torch.allclose(effective(res, module), client_effective(same[0], module), atol=1e-5)
    for key in HEAD:
        assert torch.allclose(res.adapter[key], same[0].state[key], atol=1e-6)


@given(
    ranks=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=4),
    counts=st.lists(st.integers(1, 100), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
    perm_seed=st.integers(0, 2**16),
)
@settings(max_examples=8, deadline=None)
def test_client_order_invariance(ranks, counts, seed, perm_seed):
    for param in CONFIGS:
        strategy = build(param.values[0])
        init, _, updates = round_one(strategy, ranks, counts[: len(ranks)], seed=seed)
        perm = torch.randperm(len(updates), generator=torch.Generator().manual_seed(perm_seed)).tolist()
        r1 = strategy.aggregate(init.adapter, init.state, updates, server_round=1)
        r2 = strategy.aggregate(init.adapter, init.state, [updates[i] for i in perm], server_round=1)
        assert_same_effect(r1, r2)
        for key in r1.metrics:
            assert r1.metrics[key] == pytest.approx(r2.metrics[key], rel=1e-4, abs=1e-6), (param.id, key)


@pytest.mark.parametrize("node", CONFIGS)
def test_unequal_scalings_are_refused(node):
    # Regression: FlexLoRA's HeteroLoRA rescales by alpha only on load (asymmetric handling);
    # every fedlora strategy refuses updates with different s = alpha / r.
    strategy = build(node)
    init, _, updates = round_one(strategy, [4, 2], [1, 1])
    bad = [updates[0], ClientUpdate(1, 2, 16.0 / 2, 1, updates[1].state)]
    with pytest.raises(ValueError, match="scaling"):
        strategy.aggregate(init.adapter, init.state, bad, server_round=1)


@pytest.mark.parametrize("node", CONFIGS)
def test_aggregate_is_deterministic_and_does_not_mutate_inputs(node):
    strategy = build(node)
    init, _, updates = round_one(strategy, [8, 2], [3, 4])
    snapshot = [{k: v.clone() for k, v in u.state.items()} for u in updates]
    g_snapshot = {k: v.clone() for k, v in init.adapter.items()}
    r1 = strategy.aggregate(init.adapter, init.state, updates, server_round=1)
    r2 = strategy.aggregate(init.adapter, init.state, updates, server_round=1)
    for key in r1.adapter:
        assert torch.equal(r1.adapter[key], r2.adapter[key])
    for u, snap in zip(updates, snapshot, strict=False):
        assert all(torch.equal(u.state[k], snap[k]) for k in snap)
    assert all(torch.equal(init.adapter[k], g_snapshot[k]) for k in g_snapshot)


# -- the linearity a strategy declares (client-level DP and secure aggregation rely on it) ----------------


def _linearity_cases():
    from strategies.fedavg import FedAvg

    cases = [pytest.param(build(p.values[0]), id=p.id) for p in CONFIGS]
    cases += [pytest.param(FedAvg(weighting="norm"), id="fedavg-norm"),
              pytest.param(FedAvg(padding="owners"), id="fedavg-owners")]
    return cases


@pytest.mark.parametrize("strategy", _linearity_cases())
def test_a_linear_strategy_aggregates_the_mean_of_its_per_client_images(strategy):
    # linear: S(all, equal weights) == mean_k S({k}), each image a function of one update alone (RoLoRA: both
    # phases). Not linear: the identity fails on generic mixed-rank updates, and the strategy says why.
    gaps = []
    for server_round in (1, 2):
        init, _, updates = round_one(strategy, [8, 4, 2], [10, 10, 10], seed=server_round, server_round=server_round)
        whole = strategy.aggregate(init.adapter, init.state, updates, server_round=server_round)
        images = [strategy.aggregate(init.adapter, init.state, [u], server_round=server_round) for u in updates]
        merged = whole.merge is not None or any(i.merge is not None for i in images)
        gap = max(float((whole.adapter[k].double() - sum(i.adapter[k].double() for i in images) / 3).abs().max())
                  for k in init.adapter)
        gaps.append(math.inf if merged else gap)
    if strategy.linear:
        assert strategy.why_not_linear == "" and max(gaps) < 1e-6, gaps
    else:
        assert len(strategy.why_not_linear) > 20 and max(gaps) > 1e-3, gaps


@pytest.mark.parametrize("strategy", [c for c in _linearity_cases() if c.values[0].linear])
def test_a_linear_strategy_aggregates_the_same_from_the_secure_sum_alone(strategy):
    # Secure aggregation hands the strategy one update: sum_k n_k embed(x_k) / sum_k n_k at r_max
    # (fedlora.core.secure). For a linear strategy that is its aggregate of the individual updates.
    from fedlora.core import secure
    from fedlora.federation import wire

    for server_round in (1, 2):  # RoLoRA: both phases
        init, plans, updates = round_one(strategy, [8, 4, 2], [3, 5, 11], seed=server_round,
                                         server_round=server_round)
        whole = strategy.aggregate(init.adapter, init.state, updates, server_round=server_round)
        wide = strategy.plan(init.adapter, init.state, client_id=-1, rank=8, server_round=server_round, seed=SEED)
        start = lm.plan_start(wide, MODULES)
        keys = wire.uplink_keys(wide, start)
        plan = secure.layout({k: start[k].shape for k in keys}, 8)
        total = torch.zeros(secure.vector_size(plan), dtype=torch.float64)
        for p, u in zip(plans, updates, strict=True):
            sent = wire.uplink_keys(p, lm.plan_start(p, MODULES))
            assert sorted(sent) == sorted(keys)  # every client sends the same tensors, at its own rank
            total += u.num_examples * secure.embed({k: u.state[k] for k in sent}, plan)
        virtual = secure.mean_update(total, sum(u.num_examples for u in updates), plan, start, scaling=S)
        alone = strategy.aggregate(init.adapter, init.state, [virtual], server_round=server_round)
        for key in whole.adapter:
            gap = float((whole.adapter[key].double() - alone.adapter[key].double()).abs().max())
            assert gap < 1e-6, (key, gap)


def test_embed_and_unembed_are_inverse_and_pad_with_zeros():
    from fedlora.core import secure

    a, b = lm.lora_a_key("m"), lm.lora_b_key("m")
    tensors = {a: torch.randn(2, 5), b: torch.randn(3, 2), "head.bias": torch.randn(4)}
    plan = secure.layout({k: v.shape for k, v in tensors.items()}, 6)
    assert dict(plan) == {a: (6, 5), b: (3, 6), "head.bias": (4,)}
    vector = secure.embed(tensors, plan)
    assert vector.dtype == torch.float64 and vector.numel() == secure.vector_size(plan) == 30 + 18 + 4
    back = secure.unembed(vector, plan)
    assert torch.equal(back[a][:2], tensors[a]) and not back[a][2:].any()
    assert torch.equal(back[b][:, :2], tensors[b]) and not back[b][:, 2:].any()
    assert torch.equal(back["head.bias"], tensors["head.bias"])
    with pytest.raises(ValueError, match="tensors"):
        secure.embed({a: tensors[a]}, plan)
    with pytest.raises(ValueError, match="larger than the layout"):
        secure.embed({**tensors, a: torch.randn(7, 5)}, plan)
