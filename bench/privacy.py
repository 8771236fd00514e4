"""Benchmark 7: what privacy costs: DP-SGD in a client's round, DP-FedAvg's and SecAgg+'s aggregation, the bytes.

1. **Local training** (``privacy=dp_sgd``): one client's round of the default task (MiniLM, its
   Dirichlet partition, ``train.local_steps`` AdamW steps at ``train.batch_size``) timed with plain
   training and with Opacus' DP-SGD (per-example gradients, clipping, noise), at the smallest and the
   largest rank of the default tiers; min and median of ``--repeats`` rounds each, same seeds.
2. **Aggregation** (``privacy=dp_fedavg``): the server's private aggregate (one strategy call per
   client for its image, clipping, noise) against the strategy's own ``aggregate``, FedAvg and
   FFA-LoRA, on the default task's adapter shapes (12 modules of 384 x 384) and on LLaMA-7B-shaped
   ones (64 modules of 4096 x 4096), 10 clients at ranks 2/4/8/16.
3. **Secure aggregation's protocol** (``privacy=secagg``): SecAgg+ in-process over 10 real ClientApps
   with Flower's mod, each answering a fixed vector of the default task's rank-16 layout (its
   uplink at rank 16: 12 modules' ``A`` and ``B`` and the head) and of a LLaMA-7B-shaped rank-16
   layout (8 of its 64 modules with ``--quick``), against the plain weighted sum of the same
   vectors: the protocol's own cost, both sides in one process (the clients' keys, shares, masks and
   quantization and the server's unmasking), no training, no network; and the same with one client
   dropping after it shared its keys.
4. **Runs** (``--runs``): the quick setting (3 clients, 3 rounds) with ``privacy=none``, ``dp_sgd``,
   ``dp_fedavg``, ``secagg`` and each DP level with ``privacy.secure=true``: median round seconds and the
   bytes up and down per round (what each mode adds on the wire).

    PYTHONPATH=. python bench/privacy.py [--quick] [--runs | --runs-only] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import QUICK, compose, machine, run_fedlora, write_results  # noqa: E402
from fedlora.core import lora_math as lm  # noqa: E402
from fedlora.core.privacy import ClientLevel, private_mean  # noqa: E402
from fedlora.core.types import AdapterSpec, ClientUpdate  # noqa: E402


def _times(fn: Any, repeats: int) -> dict[str, float]:
    values = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        values.append(time.perf_counter() - t0)
    return {"min": min(values), "median": statistics.median(values)}


def _client_round(ws: Any, rank: int, start: Any, indices: list[int], train: Any, train_steps: Any) -> None:
    ws.host.load_state(rank, start)
    train_steps(ws.host.model, ws.host.set_trainable(rank, True), ws.data, indices, train, seed=3)


def _plain_aggregate(strategy: Any, init: Any, updates: list[ClientUpdate]) -> None:
    strategy.aggregate(init.adapter, init.state, updates, server_round=1)


def _private_aggregate(strategy: Any, init: Any, updates: list[ClientUpdate], noised: set[str],
                       level: ClientLevel) -> None:
    images = [strategy.aggregate(init.adapter, init.state, [u], server_round=1).adapter for u in updates]
    private_mean(init.adapter, images, noised, level, torch.Generator().manual_seed(1))


def local_training(repeats: int, quick: bool) -> list[dict[str, Any]]:
    """Item 1: a client's round, plain and with DP-SGD, at the smallest and largest default rank."""
    import dataclasses

    from fedlora.config.settings import Settings
    from fedlora.runtime.training import dp as dpsgd
    from fedlora.runtime.training.local import train_steps
    from fedlora.runtime.training.workspace import get_workspace

    settings = Settings.from_config(compose(["privacy=dp_sgd", *(["train.local_steps=2"] if quick else [])]))
    ws = get_workspace(settings.workspace_key())
    plain = dataclasses.replace(settings.train, dp=None)
    private = settings.train
    assert private.dp is not None
    indices = ws.partition(0)
    out = []
    for rank in (min(settings.ranks.tiers), max(settings.ranks.tiers)):
        ws.host.activate(rank)
        start = ws.host.get_state(rank)
        row: dict[str, Any] = {"rank": rank, "examples": len(indices), "local_steps": plain.local_steps,
                               "batch_size": plain.batch_size,
                               "noise_multiplier": dpsgd.noise_multiplier(private.dp, len(indices), plain.batch_size,
                                                                          plain.local_steps)}
        for name, train in (("plain", plain), ("dp_sgd", private)):
            one = functools.partial(_client_round, ws, rank, start, indices, train, train_steps)
            one()  # warm-up (first calls allocate)
            row[name] = _times(one, repeats)
        row["ratio_median"] = row["dp_sgd"]["median"] / row["plain"]["median"]
        print(f"  rank {rank:>2}: plain {row['plain']['median']:.2f} s, DP-SGD {row['dp_sgd']['median']:.2f} s "
              f"(x{row['ratio_median']:.2f}; min {row['plain']['min']:.2f} / {row['dp_sgd']['min']:.2f} s), "
              f"noise multiplier {row['noise_multiplier']:.3f}", flush=True)
        out.append(row)
    return out


def aggregation(repeats: int, quick: bool) -> list[dict[str, Any]]:
    """Item 2: DP-FedAvg's private aggregate against the strategy's own, FedAvg and FFA-LoRA."""
    from strategies.fedavg import FedAvg
    from strategies.ffa_lora import FFALoRA

    shapes = {"default task (12 x 384x384)": {f"layer.{i}.{p}": (384, 384) for i in range(6) for p in ("q", "v")},
              "LLaMA-7B (64 x 4096x4096)": {f"layers.{i}.{p}": (4096, 4096) for i in range(4 if quick else 32)
                                            for p in ("q_proj", "v_proj")}}
    ranks = [2, 4, 8, 16] * 2 + [2, 4]
    out = []
    for shape_name, modules in shapes.items():
        head = {"classifier.weight": torch.zeros(5, 384), "classifier.bias": torch.zeros(5)}
        for strategy in (FedAvg(), FFALoRA()):
            init = strategy.init(AdapterSpec(modules, 16, 2.0, head), 0)
            gen = torch.Generator().manual_seed(0)
            updates, noised = [], set()
            for cid, rank in enumerate(ranks):
                plan = strategy.plan(init.adapter, init.state, client_id=cid, rank=rank, server_round=1, seed=0)
                start = lm.plan_start(plan, modules)
                state = {k: v if (k.endswith("lora_A.weight") and not plan.train_lora_a)
                         else v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
                noised |= {k for k in state if not (k.endswith("lora_A.weight") and not plan.train_lora_a)}
                updates.append(ClientUpdate(cid, rank, 2.0, 50, state))
            level = ClientLevel(clip=1.0, noise_multiplier=1.0, denominator=len(updates))

            row = {"shapes": shape_name, "strategy": type(strategy).__name__, "clients": len(updates),
                   "plain": _times(functools.partial(_plain_aggregate, strategy, init, updates), repeats),
                   "dp_fedavg": _times(functools.partial(_private_aggregate, strategy, init, updates, noised, level),
                                       repeats)}
            print(f"  {shape_name}, {row['strategy']}: aggregate {row['plain']['median']:.3f} s, private "
                  f"{row['dp_fedavg']['median']:.3f} s", flush=True)
            out.append(row)
    return out


def runs(work: Path) -> list[dict[str, Any]]:
    """Item 4: the quick federation with each privacy mode: round time and bytes per round."""
    out = []
    for mode in ("none", "dp_sgd", "dp_fedavg", "secagg", "dp_sgd+secure", "dp_fedavg+secure"):
        kind, _, secure = mode.partition("+")
        overrides = [*QUICK, "num_rounds=3", f"privacy={kind}", "strategy=fedavg",
                     *(["privacy.secure=true"] if secure else [])]
        result = run_fedlora(overrides, work / f"privacy_{mode.replace('+', '_')}")
        rounds = result["rows"][1:]
        row = {"privacy": mode, "wall": result["wall"],
               "round_seconds_median": statistics.median(r["round_seconds"] for r in rounds),
               "bytes_up_per_round": statistics.mean(r["bytes_up_total"] for r in rounds),
               "bytes_down_per_round": statistics.mean(r["bytes_down_total"] for r in rounds),
               "final_accuracy": rounds[-1]["test_accuracy"], "dp_epsilon": result["summary"].get("dp_epsilon")}
        print(f"  privacy={mode}: round {row['round_seconds_median']:.2f} s (median of 3), up "
              f"{row['bytes_up_per_round']:.0f} B, down {row['bytes_down_per_round']:.0f} B per round, "
              f"epsilon {row['dp_epsilon']}", flush=True)
        out.append(row)
    return out


def _secagg_nodes(n: int, size: int) -> tuple[Any, dict[int, Any], dict[int, Any]]:
    """``n`` ClientApps with Flower's SecAgg+ mod, node ``i`` answering a fixed vector of ``size`` entries."""
    import numpy as np
    from flwr.app import Context, Message, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    from fedlora.flower.secagg import vector_reply

    vectors = {i: np.random.default_rng(i).normal(0.0, 0.05, size) for i in range(1, n + 1)}
    contexts = {i: Context(run_id=1, node_id=i, node_config={}, state=RecordDict(), run_config={}) for i in vectors}
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(vector_reply(vectors[context.node_id], 100 + context.node_id), reply_to=msg)

    return app, contexts, vectors


def _secagg_send(app: Any, contexts: dict[int, Any], drop: int | None, messages: Any, _timeout: float) -> list[Any]:
    """Deliver each message to its node's ClientApp; node ``drop`` vanishes after it shared its keys."""
    replies = []
    for msg in messages:
        node = msg.metadata.dst_node_id
        if node == drop and msg.content.config_records["secaggplus_configs"]["stage"] == "collect_masked_vectors":
            continue  # its pairwise masks must be removed by the others' shares
        replies.append(app(msg, contexts[node]))
    return replies


def _weighted_sum(vectors: dict[int, Any]) -> Any:
    return sum((100 + n) * v for n, v in vectors.items())


def secure_protocol(repeats: int, quick: bool) -> list[dict[str, Any]]:
    """Item 3: SecAgg+ over 10 in-process ClientApps against the plain weighted sum of the same vectors."""
    import logging
    import random

    from flwr.app import RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora.core import secure
    from fedlora.flower.secagg import SecAggSettings, secure_sum

    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # what a ServerApp has
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the mod logs every stage of every node at DEBUG
    layouts = {"default task, rank 16 (12 x 384x384 + head)":
               {**{lm.lora_a_key(f"m{i}"): (16, 384) for i in range(12)},
                **{lm.lora_b_key(f"m{i}"): (384, 16) for i in range(12)}, "head.weight": (5, 384), "head.bias": (5,)},
               "LLaMA-7B, rank 16 (64 x 4096x4096)":
               {**{lm.lora_a_key(f"m{i}"): (16, 4096) for i in range(8 if quick else 64)},
                **{lm.lora_b_key(f"m{i}"): (4096, 16) for i in range(8 if quick else 64)}}}
    out = []
    for name, shapes in layouts.items():
        size = secure.vector_size(secure.layout(shapes, 16))
        app, contexts, vectors = _secagg_nodes(10, size)
        for drop in (None, 3):
            send = functools.partial(_secagg_send, app, contexts, drop)
            protocol = functools.partial(secure_sum, send, sorted(vectors), {n: RecordDict() for n in vectors},
                                         SecAggSettings(max_weight=128), group_id="1", rng=random.Random(0))
            plain = functools.partial(_weighted_sum, vectors)
            row = {"layout": name, "entries": size, "clients": 10, "dropped": 0 if drop is None else 1,
                   "secure": _times(protocol, repeats), "plain_sum": _times(plain, repeats)}
            print(f"  {name}, {size} entries, 10 clients{', one dropping' if drop else ''}: SecAgg+ "
                  f"{row['secure']['median']:.2f} s, plain sum {row['plain_sum']['median']:.4f} s", flush=True)
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke: fewer steps, 4 LLaMA layers, 1 repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--runs", action="store_true", help="also run the quick federation with each mode (3 min)")
    parser.add_argument("--runs-only", action="store_true", help="only item 4 (its bytes do not depend on the load)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    results: dict[str, Any] = {"machine": machine(), "repeats": repeats, "quick": args.quick}
    if not args.runs_only:
        print("1. a client's round, plain and with DP-SGD", flush=True)
        results["local_training"] = local_training(repeats, args.quick)
        print("2. the server's aggregate, plain and with DP-FedAvg", flush=True)
        results["aggregation"] = aggregation(repeats, args.quick)
        print("3. secure aggregation's protocol, in-process", flush=True)
        results["secure_protocol"] = secure_protocol(repeats, args.quick)
    work = Path(tempfile.mkdtemp(prefix="fedlora-bench-privacy-"))
    if args.runs or args.runs_only:
        print("4. the quick federation with each privacy mode", flush=True)
        results["runs"] = runs(work)
    write_results(results, args.json, work)


if __name__ == "__main__":
    main()
