"""Benchmark 3: server aggregation time of every strategy on LLaMA-7B-shaped adapters.

Synthetic adapters shaped like LoRA on LLaMA-7B's attention: 32 layers x (q_proj, v_proj), each
``4096 x 4096``, i.e. 64 adapted modules, ``A`` ``(r, 4096)`` and ``B`` ``(4096, r)``; 10 clients.
Two rank settings: every client at rank 16 (``homo``) and mixed ranks 2/4/8/16 cycled over the
clients (``mixed``, global rank 16).

Every strategy in ``conf/strategy/*.yaml`` (except ``centralized``, which has no server
aggregation) is instantiated from its YAML ``_target_`` and keyword arguments, plus the
non-default variants that change the aggregation path (FedAvg ``weighting=norm`` = HetLoRA and
``padding=owners``). The client updates are built the way the platform builds them: the
strategy's ``plan`` gives each client's start adapter (FLoRA: a fresh one), then every trainable
factor is perturbed (a factor only when the plan trains it, so FFA-LoRA's shared ``A`` and RoLoRA's
frozen factor stay bit-identical as their ``aggregate`` checks).

For each strategy: the best (and median) wall time of ``aggregate`` over ``--repeats`` calls, and
whether any torch op inside ``aggregate`` produced a tensor of ``m * n`` elements or more (a dense
``m x n`` update), found with a ``TorchFunctionMode`` in a separate, untimed call. ComPEFT:
``compress`` and ``decode`` of one client's (rank-16) update, and its packing through the wire
format. A strategy slower than ``--target`` seconds is profiled with cProfile (top functions printed).

    PYTHONPATH=. python bench/aggregation.py            # full: homo + mixed, 3 repeats
    PYTHONPATH=. python bench/aggregation.py --quick    # smoke: 4 layers, 1 repeat
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedlora.core import lora_math as lm  # noqa: E402
from fedlora.core.types import AdapterSpec, ClientUpdate  # noqa: E402

# Non-default variants whose aggregate takes another code path.
VARIANTS = {"fedavg": [{"weighting": "norm"}, {"padding": "owners"}]}


def llama7b_modules(layers: int = 32, width: int = 4096) -> dict[str, tuple[int, int]]:
    """``{module: (m, n)}`` of LoRA on LLaMA-7B's ``q_proj`` and ``v_proj`` (peft key prefixes)."""
    return {
        f"base_model.model.model.layers.{i}.self_attn.{p}": (width, width)
        for i in range(layers) for p in ("q_proj", "v_proj")
    }


def load_strategies(conf_dir: Path) -> dict[str, Any]:
    """Instantiate every ``conf/strategy/*.yaml`` (``_target_`` + kwargs) and the variants."""
    out = {}
    for path in sorted(conf_dir.glob("*.yaml")):
        node = yaml.safe_load(path.read_text()) or {}
        if "_target_" not in node:  # centralized: the pooled bound, FedAvg of one learner, no aggregation to time
            continue
        target = node.pop("_target_")
        module, _, attr = target.rpartition(".")
        cls = getattr(importlib.import_module(module), attr)
        out[path.stem] = cls(**node)
        for extra in VARIANTS.get(path.stem, []):
            name = path.stem + "[" + ",".join(f"{k}={v}" for k, v in extra.items()) + "]"
            out[name] = cls(**{**node, **extra})
    return out


def make_updates(strategy: Any, spec: AdapterSpec, ranks: list[int], seed: int, noise: float = 0.01):
    """Return (global adapter, strategy state, client updates) for one synthetic round."""
    init = strategy.init(spec, seed)
    updates = []
    for cid, rank in enumerate(ranks):
        plan = strategy.plan(init.adapter, init.state, client_id=cid, rank=rank, server_round=1, seed=seed)
        if plan.adapter is None:
            start = lm.fresh_state(spec.modules, rank, plan.init_seed, plan.head)
        else:
            start = {k: v.clone() for k, v in plan.adapter.items()}
        gen = torch.Generator().manual_seed(seed * 1000 + cid)
        state = {}
        for key, value in start.items():
            frozen = (key.endswith(".lora_A.weight") and not plan.train_lora_a) or (
                key.endswith(".lora_B.weight") and not plan.train_lora_b)
            if frozen:
                state[key] = value
            else:
                state[key] = value + noise * torch.randn(value.shape, generator=gen)
        updates.append(ClientUpdate(cid, rank, spec.scaling, 100 + 37 * cid, state))
    return init.adapter, dict(init.state), updates


class DenseWatch(TorchFunctionMode):
    """Record the largest tensor any torch op returns (a dense ``m x n`` update would show here)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0
        self.max_op = ""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.max_op = t.numel(), getattr(func, "__name__", str(func))
        return out


def time_call(fn, repeats: int, cpu: list[float] | None = None) -> list[float]:  # noqa: ANN001
    """Wall seconds of ``repeats`` calls; appends each call's process CPU seconds to ``cpu``."""
    times = []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return times


def profile_call(fn, top: int = 12) -> str:  # noqa: ANN001
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def bench_strategy(name: str, strategy: Any, spec: AdapterSpec, ranks: list[int], repeats: int,
                   target: float, seed: int = 0) -> dict[str, Any]:
    glob, sstate, updates = make_updates(strategy, spec, ranks, seed)

    def call():  # noqa: ANN202
        return strategy.aggregate(glob, sstate, updates, server_round=1)

    call()  # warm-up (allocator, lazy imports); not timed
    cpu: list[float] = []
    times = time_call(call, repeats, cpu)
    watch = DenseWatch()
    with watch:
        call()
    m, n = next(iter(spec.modules.values()))
    row = {
        "strategy": name, "seconds_best": min(times), "seconds_median": statistics.median(times),
        "cpu_seconds_best": min(cpu),
        "largest_tensor_numel": watch.max_numel, "largest_tensor_op": watch.max_op,
        "dense_mxn": watch.max_numel >= m * n,
    }
    if min(times) > target:
        row["profile"] = profile_call(call)
    return row


def bench_compeft(spec: AdapterSpec, rank: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    from fedlora.compression.compeft import ComPEFT  # noqa: PLC0415
    from fedlora.federation import wire  # noqa: PLC0415

    node = yaml.safe_load((ROOT / "conf/compression/compeft.yaml").read_text())
    node.pop("_target_")
    node["error_feedback"] = True  # every tensor continues (FedAvg-like): time the residual path
    comp = ComPEFT(**node)
    gen = torch.Generator().manual_seed(seed)
    delta = {}
    for module, (m, n) in spec.modules.items():
        delta[lm.lora_a_key(module)] = 0.01 * torch.randn((rank, n), generator=gen)
        delta[lm.lora_b_key(module)] = 0.01 * torch.randn((m, rank), generator=gen)
    keys = sorted(delta)
    residual = {k: torch.zeros_like(v) for k, v in delta.items()}
    payload, _ = comp.compress(delta, residual)
    t_comp = time_call(lambda: comp.compress(delta, residual), repeats)
    t_pack = time_call(lambda: wire.pack_payload(payload, keys), repeats)
    packed = wire.pack_payload(payload, keys)
    t_unpack = time_call(lambda: wire.unpack_payload(packed, keys), repeats)
    t_dec = time_call(lambda: comp.decode(payload), repeats)
    raw = sum(v.numel() * 4 for v in delta.values())
    return {
        "params": sum(v.numel() for v in delta.values()), "density": comp.density,
        "compress_seconds": min(t_comp), "decode_seconds": min(t_dec),
        "pack_seconds": min(t_pack), "unpack_seconds": min(t_unpack),
        "bytes_fp32": raw, "bytes_encoded": sum(int(a.nbytes) for a in packed.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 layers, 1 repeat")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2 = this machine)")
    ap.add_argument("--target", type=float, default=2.0, help="seconds; slower strategies are profiled")
    ap.add_argument("--only", default="", help="comma-separated strategy names (default: all)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.repeats = 4, 1
    torch.set_num_threads(args.threads)

    modules = llama7b_modules(args.layers, args.width)
    spec = AdapterSpec(modules=modules, r_max=args.rank, scaling=2.0, head={})
    tiers = [t for t in (2, 4, 8, 16) if t <= args.rank] or [args.rank]
    settings = {"homo": [args.rank] * args.clients,
                "mixed": [tiers[k % len(tiers)] for k in range(args.clients)]}
    strategies = load_strategies(ROOT / "conf" / "strategy")
    if args.only:
        wanted = set(args.only.split(","))
        strategies = {k: v for k, v in strategies.items() if k in wanted or k.split("[")[0] in wanted}

    print(f"# aggregation: {len(modules)} modules of {args.width}x{args.width}, {args.clients} clients, "
          f"rank {args.rank}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}", flush=True)
    results: dict[str, Any] = {"modules": len(modules), "width": args.width, "clients": args.clients,
                               "rank": args.rank, "threads": args.threads, "quick": args.quick, "rows": []}
    print(f"{'setting':7s} {'strategy':26s} {'best s':>8s} {'median s':>9s} {'cpu s':>7s}  dense m x n?")
    for setting, ranks in settings.items():
        for name, strategy in strategies.items():
            row = bench_strategy(name, strategy, spec, ranks, args.repeats, args.target)
            row["setting"] = setting
            results["rows"].append(row)
            flag = "over target" if row["seconds_best"] > args.target else ""
            print(f"{setting:7s} {name:26s} {row['seconds_best']:8.3f} {row['seconds_median']:9.3f} "
                  f"{row['cpu_seconds_best']:7.3f}  "
                  f"{'YES' if row['dense_mxn'] else 'no'} (largest tensor {row['largest_tensor_numel']:,} "
                  f"from {row['largest_tensor_op']}) {flag}", flush=True)
            if "profile" in row:
                print(row["profile"], flush=True)
    comp = bench_compeft(spec, args.rank, args.repeats)
    results["compeft"] = comp
    print(f"compeft (one rank-{args.rank} client, {comp['params']:,} params, density {comp['density']}): "
          f"compress {comp['compress_seconds']:.3f} s, decode {comp['decode_seconds']:.3f} s, "
          f"pack {comp['pack_seconds']:.3f} s, unpack {comp['unpack_seconds']:.3f} s; "
          f"{comp['bytes_fp32'] / 1e6:.1f} MB fp32 -> {comp['bytes_encoded'] / 1e6:.2f} MB "
          f"(x{args.clients} clients: {args.clients * (comp['compress_seconds'] + comp['decode_seconds']):.2f} s "
          f"of client compress + server decode in total)", flush=True)
    worst = max(r["seconds_best"] for r in results["rows"])
    results["all_under_target"] = worst <= args.target
    print(f"slowest aggregate {worst:.3f} s; target {args.target} s: "
          f"{'met' if worst <= args.target else 'MISSED'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
