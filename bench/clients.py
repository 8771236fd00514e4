"""Benchmark 6: 10, 1,000 and 10,000 clients, 10 sampled per round: memory, time to round 0, time per round.

Each federation runs ``python -m fedlora`` as a child process on the same data at every size (the
generated instructions and the tiny decoder, ``experiment=causal_demo data.max_examples=40000``:
32,000 training examples, 3 or 4 per client at 10,000; the BBC corpus has 1,781 training articles,
and more clients than examples is refused before anything starts). Measured per run:

* peak RSS and PSS summed over the ``fedlora`` process and all its descendants (Ray's processes and
  the client actors), sampled every 0.25 s (``bench.common.TreeMemory``);
* time from spawn to the moment the clients are connected (the run's first line, after Flower's
  engine registered the nodes and the greeted clients answered: a round's worth in simulation) and
  to round 0 (the line of the first evaluation: the first round starts right after it);
* ``round_seconds`` of every round (from ``metrics.jsonl``).

``--engine`` also times Flower's simulation engine alone (no Ray, no model; a few seconds): node
registration, one ``get_node_ids``, and one sweep of the thread that hands messages to the client
actors (``vce_api.add_messages_to_queue``: every 0.1 s, ``get_message_ins`` for every node, each
scanning every undelivered or unanswered message), with 0 and 10 messages waiting, and with one
hello per node (N waiting: measured up to ``--engine-hello-max`` nodes, it grows as N^2).

    PYTHONPATH=. python bench/clients.py --engine --json out.json    # 10, 1,000, 10,000 clients
    PYTHONPATH=. python bench/clients.py --quick                     # 10 and 100 clients, 1 round
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, TreeMemory, child_env, fedlora_command, machine, write_results  # noqa: E402

DATA = ["experiment=causal_demo", "partition=iid", "partition.min_partition_size=1", "train.local_steps=2",
        "train.batch_size=8", "data.max_test_examples=64"]
HELLO = re.compile(r"hello: (\d+)/(\d+) clients reported")


def overrides_for(num_clients: int, sampled: int, rounds: int, max_examples: int, extra: list[str]) -> list[str]:
    return [*DATA, f"data.max_examples={max_examples}", f"num_clients={num_clients}",
            f"fraction_train={sampled / num_clients}", f"min_clients={sampled}", f"num_rounds={rounds}", *extra]


class LogWatch:
    """Follow a log file in a thread; note when the connected line and the round-0 line appear."""

    def __init__(self, path: Path, t0: float) -> None:
        self.path, self.t0 = path, t0
        self.connected: float | None = None
        self.round0: float | None = None
        self.hello: tuple[float, int, int] | None = None  # (seconds, reported, expected) of the last progress line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                text = self.path.read_text(errors="replace")
                now = time.perf_counter() - self.t0
                for line in text[seen:].splitlines():
                    if self.connected is None and "connected, ranks" in line:
                        self.connected = now
                    if self.round0 is None and "] round 0/" in line:
                        self.round0 = now
                    if m := HELLO.search(line):
                        self.hello = (now, int(m.group(1)), int(m.group(2)))
                seen = len(text)
            self._stop.wait(0.1)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def end_tree(pid: int) -> None:
    """End the run we started (SIGTERM: it stops cleanly), then whatever of its tree is left."""
    import psutil  # noqa: PLC0415

    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        kids = root.children(recursive=True)
        root.terminate()
        _, alive = psutil.wait_procs([root], timeout=60)
        for proc in [*alive, *kids]:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def run_one(overrides: list[str], run_dir: Path, timeout: float) -> dict[str, Any]:
    """One federation: memory, the times of the connected and round-0 lines, the rounds; partial on timeout."""
    cmd, log_path = fedlora_command(overrides, run_dir)
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        watch = LogWatch(log_path, t0)
        with TreeMemory(proc.pid) as mem:
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
                end_tree(proc.pid)
                proc.wait()
        wall = time.perf_counter() - t0
        watch.close()
    out: dict[str, Any] = {
        "wall": wall, "timed_out": rc is None, "returncode": rc, "log": str(log_path),
        "connected_s": watch.connected, "round0_s": watch.round0, "peak_rss": mem.peak_rss,
        "peak_pss": mem.peak_pss, "procs_at_peak": mem.peak_procs, "peak_max_process_rss": mem.peak_max_proc,
    }
    if watch.hello:
        out["last_hello_progress"] = {"seconds": watch.hello[0], "reported": watch.hello[1], "expected": watch.hello[2]}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    if rows:
        out["round0_in_serverapp_s"] = rows[0]["wall_time"]  # from the ServerApp's start (engine already up)
        out["round_seconds"] = [r.get("round_seconds") for r in rows[1:]]
        out["clients_per_round"] = [len(r.get("clients") or []) for r in rows[1:]]
    if rc not in (0, None):
        out["error_tail"] = log_path.read_text(errors="replace")[-2000:]
    return out


# -- Flower's engine alone ------------------------------------------------------------------------------
def engine_costs(n: int, hello_max: int) -> dict[str, Any]:
    """Seconds of Flower 1.42's in-memory simulation engine at ``n`` nodes (see the module docstring)."""
    from queue import Queue  # noqa: PLC0415

    from flwr.app import ConfigRecord, Message, RecordDict  # noqa: PLC0415
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES  # noqa: PLC0415
    from flwr.proto.task_pb2 import Task  # noqa: PLC0415
    from flwr.server.superlink.fleet.vce import vce_api  # noqa: PLC0415
    from flwr.server.superlink.linkstate import LinkStateFactory  # noqa: PLC0415
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord  # noqa: PLC0415
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes  # noqa: PLC0415
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID  # noqa: PLC0415
    from flwr.supercore.object_store import ObjectStoreFactory  # noqa: PLC0415
    from flwr.supercore.run import Run  # noqa: PLC0415
    from flwr.supercore.task_identity import TaskIdentity  # noqa: PLC0415
    from flwr.superlink.federation import NoOpFederationManager  # noqa: PLC0415
    from flwr.superlink.grid import InMemoryGrid  # noqa: PLC0415

    # the set-up of flwr.simulation.run_simulation._run_simulation, without the apps and Ray
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    state = factory.state()
    state.run_ids[run.run_id] = RunRecord(run=run)  # type: ignore[attr-defined]
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)  # type: ignore[attr-defined]
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)

    def timed(fn: Any, *args: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        value = fn(*args)
        return value, time.perf_counter() - t0

    mapping, t_register = timed(vce_api._register_nodes, n, factory)
    _, t_contexts = timed(vce_api._register_node_info_stores, mapping, run, None)
    ids, t_ids = timed(grid.get_node_ids)
    ids = sorted(ids)

    def sweep() -> int:  # one pass of vce_api.add_messages_to_queue
        queue: Queue[Message] = Queue()
        for node_id in mapping:
            for msg in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(msg)
        return queue.qsize()

    _, t_empty = timed(sweep)
    out: dict[str, Any] = {"nodes": n, "register_nodes_s": t_register, "register_contexts_s": t_contexts,
                           "get_node_ids_s": t_ids, "sweep_no_message_s": t_empty}
    for waiting in (10, n):
        if waiting > n or (waiting == n and n > hello_max) or (waiting == n == 10):
            continue
        step = n // waiting
        msgs = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), ids[i * step], "query", group_id="b")
                for i in range(waiting)]
        pushed = list(grid.push_messages(msgs))
        _, t_deliver = timed(sweep)  # hands each waiting message to the queue
        _, t_pending = timed(sweep)  # nothing new: what each 0.1 s costs while the replies are awaited
        state.delete_messages(set(pushed))
        key = "hello" if waiting == n else f"{waiting}_messages"
        out[f"sweep_{key}_deliver_s"], out[f"sweep_{key}_waiting_s"] = t_deliver, t_pending
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 10 and 100 clients, 1 round")
    ap.add_argument("--clients", default="10,1000,10000")
    ap.add_argument("--sampled", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-examples", type=int, default=40000, help="generated instructions (the same at every size)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per federation before it is stopped")
    ap.add_argument("--engine", action="store_true", help="also time Flower's engine alone (no Ray)")
    ap.add_argument("--engine-only", action="store_true", help="only time Flower's engine (no federation)")
    ap.add_argument("--engine-hello-max", type=int, default=1000, help="largest node count for the hello sweep")
    ap.add_argument("--extra", default="", help="more overrides, comma-separated")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep run directories and logs here")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.max_examples = "10,100", 1, 2000
    sizes = [int(x) for x in args.clients.split(",")]
    extra = [x for x in args.extra.split(",") if x]
    info = machine()
    print(f"# clients: {info}", flush=True)
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "max_examples": args.max_examples,
                               "sampled": args.sampled, "rounds": args.rounds, "runs": {}, "engine": {}}
    results["partition_seconds"] = {}
    for n in sizes:  # the data side of a large federation: split 32,000 examples IID over n clients
        from fedlora.runtime.data.partition import partition_indices  # noqa: PLC0415

        labels = [i % 5 for i in range(32000)]
        t0 = time.perf_counter()
        partition_indices(labels, n, kind="iid")
        results["partition_seconds"][n] = time.perf_counter() - t0
        print(f"partition of 32,000 examples over {n} clients: {results['partition_seconds'][n]:.3f} s "
              "(10.6 s at 10,000 when every partition was a Dataset.shard, 2026-12-02)", flush=True)
    if args.engine or args.engine_only:
        for n in sizes:
            row = engine_costs(n, args.engine_hello_max)
            results["engine"][n] = row
            print("engine " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in row.items()), flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="fedlora-clients-"))
    for n in [] if args.engine_only else sizes:
        row = run_one(overrides_for(n, args.sampled, args.rounds, args.max_examples, extra),
                      work / f"clients_{n}" / "run", args.timeout)
        results["runs"][n] = row
        rounds = ", ".join(f"{s:.2f}" for s in row.get("round_seconds") or [])
        status = "TIMED OUT " if row["timed_out"] else ("FAILED " if row["returncode"] else "")
        progress = row.get("last_hello_progress")
        print(f"{n:6d} clients ({args.sampled} per round): {status}peak RSS {row['peak_rss'] / 2**30:.2f} GiB "
              f"(PSS {row['peak_pss'] / 2**30:.2f} GiB, {row['procs_at_peak']} processes), connected at "
              f"{row['connected_s'] or float('nan'):.1f} s, round 0 at {row['round0_s'] or float('nan'):.1f} s, "
              f"rounds {rounds or '-'} s, wall {row['wall']:.1f} s"
              + (f"; last hello progress {progress['reported']}/{progress['expected']} at {progress['seconds']:.0f} s"
                 if progress and row["timed_out"] else ""), flush=True)
    runs = {n: r for n, r in results["runs"].items() if not r["timed_out"] and not r["returncode"]}
    if len(runs) > 1:
        lo, hi = min(runs), max(runs)
        results["ratios"] = {
            "clients": [lo, hi], "peak_rss": runs[hi]["peak_rss"] / runs[lo]["peak_rss"],
            "peak_pss": runs[hi]["peak_pss"] / runs[lo]["peak_pss"],
            "round0": (runs[hi]["round0_s"] or 0) / (runs[lo]["round0_s"] or 1)}
        r = results["ratios"]
        print(f"{hi} / {lo} clients: peak RSS x{r['peak_rss']:.3f} (target <= 1.5), PSS x{r['peak_pss']:.3f}, "
              f"time to round 0 x{r['round0']:.2f} (target <= 2)", flush=True)
    write_results(results, args.json, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
