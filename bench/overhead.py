"""Benchmark 1: wall time of a fedlora simulation / wall time of a bare PyTorch loop.

For each variant, two child processes run the **same local training steps**:

* ``sim``: the real ``python -m fedlora <overrides>`` (Hydra, validation, Ray, the Flower
  ServerApp and ClientApps, serialization, server-side evaluation of every round, outputs);
* ``bare``: one Python process (``bench/overhead.py --bare-worker``) with ``torch`` using as many
  threads as the simulation has CPUs, that builds the same model (``AdapterHost``: MiniLM + peft)
  and the same tokenized data and partitions, then for every round and every sampled client
  (the same seeded sample) starts from the strategy's plan, runs ``train_steps`` with the
  client's seed (``cfg.seed * 1_000_003 + round * 1009 + cid``, as ``client_app.handle_train``;
  hence the same batches from ``batch_plan``), and aggregates with the same strategy. No Flower,
  no Ray, no serialization, no evaluation, no outputs.

Both are timed from process spawn to exit, in this script, one after the other (the bare loop's
time less the one evaluation its worker runs after training to price an evaluation for the
breakdown; before 2026-11-29 that evaluation was left in, which flattered the ratios). The ratio
``sim / bare`` is the headline; the breakdown (from the run's ``metrics.jsonl``: evaluation
seconds, round times, client training seconds; from the bare worker: import, load, training)
says where the rest goes. The client training losses of both are compared per (round, client):
they agree up to floating-point summation order (the simulation's actors use 1 thread each, the
bare loop all threads), which shows that both ran the same steps on the same batches.

Variants (``--variants``): ``r1`` and ``r5`` (the default experiment at 1 and 5 rounds),
``reload`` (``r1`` with ``simulation.reload_model_per_call=true``: every train call loads the base
model again, the common client pattern; compared with ``r1``'s bare loop) and ``larger``
(50 clients, 10 sampled per round, 128 tokens: twice the step cost, one round).

    PYTHONPATH=. python bench/overhead.py             # full (idle machine: ~10 minutes)
    PYTHONPATH=. python bench/overhead.py --quick     # smoke: 3 clients, 2 steps of 8, ~3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import QUICK, ROOT, child_env, compose, machine, run_fedlora, warm_up, write_results  # noqa: E402

# name -> (overrides, the variant whose bare loop it is compared with)
FULL = {
    "r1": (["num_rounds=1"], "r1"),
    "r5": (["num_rounds=5"], "r5"),
    "reload": (["num_rounds=1", "simulation.reload_model_per_call=true"], "r1"),
    "larger": (["num_clients=50", "fraction_train=0.2", "model.max_length=128", "num_rounds=1",
                "partition.min_partition_size=5"], "larger"),
}
QUICK_VARIANTS = {
    "r1": ([*QUICK, "num_rounds=1"], "r1"),
    "r5": ([*QUICK, "num_rounds=2"], "r5"),  # quick: 2 rounds stand in for 5
    "reload": ([*QUICK, "num_rounds=1", "simulation.reload_model_per_call=true"], "r1"),
    "larger": ([*QUICK, "num_clients=6", "fraction_train=0.5", "model.max_length=128", "num_rounds=1"], "larger"),
}


# -- the bare loop (runs in its own process) ---------------------------------------------------------
def bare_worker(cfg_path: Path, out_path: Path, threads: int) -> None:
    """The bare loop: same model, batches and steps as the simulation's clients, one process."""
    t0 = time.perf_counter()

    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    from fedlora.core import env  # noqa: PLC0415

    env.apply(offline=True)
    from fedlora.config.settings import Settings  # noqa: PLC0415
    from fedlora.core import lora_math as lm  # noqa: PLC0415
    from fedlora.core import seeds  # noqa: PLC0415
    from fedlora.core.types import ClientUpdate  # noqa: PLC0415
    from fedlora.federation.sampling import sample_clients  # noqa: PLC0415
    from fedlora.runtime.training.local import train_steps  # noqa: PLC0415
    from fedlora.runtime.training.workspace import Workspace  # noqa: PLC0415

    cfg = json.loads(cfg_path.read_text())
    if cfg.get("compression"):
        raise SystemExit("the bare loop supports compression=none only")
    run = Settings.from_config(cfg)
    t_import = time.perf_counter()
    ws = Workspace(run.workspace_key())  # model + tokenizer + tokenized corpus + partitions
    host = ws.host
    t_load = time.perf_counter()
    strategy = run.strategy.build()
    seed, n = run.seed, run.loop.num_clients
    ranks = run.client_ranks()
    spec = host.spec(max(ranks))
    init = strategy.init(spec, seed)
    adapter, sstate, history = init.adapter, dict(init.state), []
    settings = run.train
    losses: dict[str, float] = {}
    train_seconds, round_seconds = 0.0, []
    for rnd in range(1, int(cfg["num_rounds"]) + 1):
        t_round = time.perf_counter()
        updates = []
        for cid in sample_clients(list(range(n)), run.loop.fraction_train, rnd, seed, run.loop.min_clients):
            rank = ranks[cid]
            plan = strategy.plan(adapter, sstate, client_id=cid, rank=rank, server_round=rnd, seed=seed)
            start = lm.plan_start(plan, spec.modules)
            host.load_state(rank, start)
            params = host.set_trainable(rank, plan.train_lora_a, plan.train_lora_b)
            t_train = time.perf_counter()
            loss = train_steps(host.model, params, ws.data, ws.partition(cid), settings,
                               seeds.client_training(seed, rnd, cid))
            train_seconds += time.perf_counter() - t_train
            losses[f"{rnd}/{cid}"] = float(loss)
            updates.append(ClientUpdate(cid, rank, host.settings.scaling(rank), len(ws.partition(cid)),
                                        host.get_state(rank)))
        result = strategy.aggregate(adapter, sstate, updates, server_round=rnd)
        adapter, sstate = result.adapter, dict(result.state)
        if result.merge is not None:
            history.append(result.merge)
            host.set_base(len(history), lm.concat_merges(history))
        round_seconds.append(time.perf_counter() - t_round)
    t_end = time.perf_counter()
    # Untimed extra: what one server-side evaluation costs on this process (for the breakdown).
    from fedlora.runtime.training.local import evaluate  # noqa: PLC0415

    t_eval = time.perf_counter()
    evaluate(host.model, ws.data, ws.test, run.eval_batch_size)
    eval_once = time.perf_counter() - t_eval
    out_path.write_text(json.dumps({
        "import_seconds": t_import - t0, "load_seconds": t_load - t_import, "train_seconds": train_seconds,
        "rounds_seconds": round_seconds, "inside_seconds": t_end - t0, "losses": losses,
        "steps": len(losses) * settings.local_steps,
        "threads": torch.get_num_threads(), "eval_once_seconds": eval_once,
    }))


# -- the driver -------------------------------------------------------------------------------------
def sim_threads(cfg: dict[str, Any]) -> int:
    """CPUs the simulation may use: ``simulation.num_cpus`` or every core of this machine."""
    return int((cfg.get("simulation") or {}).get("num_cpus") or os.cpu_count() or 1)


def run_bare(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    cfg_path, out_path = work / "bare_config.json", work / "bare_out.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-worker", str(cfg_path), str(out_path),
           "--threads", str(sim_threads(cfg))]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=child_env(), check=True)
    wall = time.perf_counter() - t0
    out = json.loads(out_path.read_text())
    # The worker evaluates once after training (only to price an evaluation for the breakdown);
    # that is not training work, so it is taken out of the wall time the ratio divides by.
    out["wall_with_extra_eval"] = wall
    out["wall"] = wall - out["eval_once_seconds"]
    return out


def breakdown(sim: dict[str, Any]) -> dict[str, float]:
    """Split the simulation's wall time using its metrics.jsonl and summary.json."""
    rows, summary = sim["rows"], sim["summary"]
    server = float(summary["wall_time_seconds"])
    evals = sum(float(r.get("eval_seconds", 0.0)) for r in rows)
    rounds = sum(float(r.get("round_seconds", 0.0)) for r in rows[1:])
    client_train = sum(float(c.get("train_seconds", 0.0)) for r in rows[1:] for c in r["clients"])
    return {
        "outside_server": sim["wall"] - server,  # python + imports + validation + Ray start/stop + server model
        "until_round0": float(rows[0]["wall_time"]),  # clients connect (actors build their workspace) + eval 0
        "eval_total": evals, "rounds_total": rounds,
        "rounds_minus_eval": rounds - (evals - float(rows[0].get("eval_seconds", 0.0))),
        "finish": server - float(rows[-1]["wall_time"]),  # save the adapter (loads the base), plot, summary
        "client_train_seconds_sum": client_train,
    }


def compare_losses(sim: dict[str, Any], bare: dict[str, Any]) -> tuple[float, int]:
    diffs = []
    for row in sim["rows"][1:]:
        for c in row["clients"]:
            key = f"{row['round']}/{c['client']}"
            if key in bare["losses"] and c.get("train_loss") is not None:
                diffs.append(abs(float(c["train_loss"]) - bare["losses"][key]))
    return (max(diffs) if diffs else float("nan")), len(diffs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test with tiny settings")
    ap.add_argument("--variants", default="r1,r5,reload,larger")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", type=Path, help="keep run directories and logs here (default: a temp dir)")
    ap.add_argument("--bare-worker", nargs=2, type=Path, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_worker:
        bare_worker(*args.bare_worker, args.threads)
        return 0

    table = QUICK_VARIANTS if args.quick else FULL
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in table]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(table)}")
    work = args.keep or Path(tempfile.mkdtemp(prefix="fedlora-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"# overhead: {info}", flush=True)
    print(f"# warm-up (imports, model files into the page cache): {warm_up():.1f} s (not counted)", flush=True)
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "variants": {}}
    bares: dict[str, dict[str, Any]] = {}
    for name in names:
        overrides, bare_of = table[name]
        if bare_of not in bares:
            base_overrides = table[bare_of][0]
            cfg = compose(base_overrides)
            (work / bare_of).mkdir(exist_ok=True)
            bares[bare_of] = run_bare(cfg, work / bare_of)
            b = bares[bare_of]
            print(f"[{bare_of}] bare loop: {b['wall']:.1f} s wall ({b['import_seconds']:.1f} import, "
                  f"{b['load_seconds']:.1f} model+data, {b['train_seconds']:.1f} training "
                  f"{b['steps']} steps, {b['threads']} threads)", flush=True)
        bare = bares[bare_of]
        sim = run_fedlora(overrides, work / name / "run")
        parts = breakdown(sim)
        max_diff, compared = compare_losses(sim, bare)
        ratio = sim["wall"] / bare["wall"]
        row = {
            "overrides": overrides, "sim_wall": sim["wall"], "bare_wall": bare["wall"],
            "bare_train": bare["train_seconds"], "ratio": ratio,
            "ratio_without_eval": (sim["wall"] - parts["eval_total"]) / bare["wall"],
            "ratio_to_training_only": sim["wall"] / bare["train_seconds"],
            "breakdown": parts, "loss_max_abs_diff": max_diff, "losses_compared": compared,
            "bare": {k: v for k, v in bare.items() if k != "losses"}, "log": sim["log"],
        }
        results["variants"][name] = row
        print(f"[{name}] fedlora: {sim['wall']:.1f} s wall; bare {bare['wall']:.1f} s -> ratio {ratio:.3f} "
              f"(without evaluation {row['ratio_without_eval']:.3f}; to bare training alone "
              f"{row['ratio_to_training_only']:.3f})", flush=True)
        print(f"[{name}]   breakdown: outside the ServerApp {parts['outside_server']:.1f} s, until round 0 "
              f"done {parts['until_round0']:.1f} s, rounds {parts['rounds_total']:.1f} s (of which evaluation "
              f"{parts['rounds_total'] - parts['rounds_minus_eval']:.1f} s), evaluation in all "
              f"{parts['eval_total']:.1f} s, finish {parts['finish']:.1f} s; clients' train calls "
              f"{parts['client_train_seconds_sum']:.1f} s summed over actors", flush=True)
        print(f"[{name}]   same steps: {compared} client losses compared, max |sim - bare| = {max_diff:.2e}",
              flush=True)
    write_results(results, args.json, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
