"""What a deployed node pays per message beyond training: a fresh process, a node worker, and with a standby.

In a deployment (Flower 1.42) every message is handled by a new ``flwr-clientapp`` process
(docs/deployment.md). Before the node worker, that process imported torch and the model code and
built the workspace (tokenizer, tokenized data, base model) for every message; with the worker it
forwards the message to the node's long-lived worker, which keeps them; with ``fedlora-supernode``
that process has also started and imported Flower before the message comes (a standby of
``fedlora-superexec``). Two measurements:

* ``parts``: the pieces in fresh processes (one torch thread, as one simulated client): importing
  what a message answered in-process imports, building the workspace, one round of training
  (cold, then warm), against importing the forwarding ClientApp module and Flower's own
  ``flwr-clientapp`` module;
* ``flower`` (the real thing): a SuperLink and one SuperNode on 127.0.0.1, ``fedlora-deploy`` of
  the given config with one client, three times: ``flower-supernode`` with ``--no-node-worker``
  (``fresh_process``: before), ``flower-supernode`` with the worker (``worker``), and
  ``fedlora-supernode`` with the worker (``worker_standby``: the default). For every training
  message the SuperNode's time from ``Receiving: train message`` to ``Sending: train message``
  (its log lines, time-stamped as they appear) minus the client's own ``train_seconds`` (decode,
  train, encode; from ``metrics.jsonl``) is the per-message overhead: Flower's part (fetching the
  message from the SuperLink, starting ``flwr-clientapp`` and its imports unless a standby did,
  the Runtime API round trips, installing the FAB, loading the ClientApp module, the reply's way
  back) plus fedlora's (imports and workspace, or forwarding). With the worker, the ClientApp logs
  how long its handler took and how long of it the worker (``forwarder_seconds``,
  ``worker_seconds``): the node time minus the handler is ``flower_part`` (which also holds the
  import of the forwarding ClientApp module, a part reported on its own above as
  ``import_forwarding_clientapp_after_flwr``), split by the log's time stamps into the
  SuperNode's download, the ClientApp until its handler starts, and the reply until ``Sending``.
  Round 1 of a worker run includes nothing cold (the hello built the worker's workspace) and is
  kept.

    PYTHONPATH=. python bench/deploy_message.py [--repeat 3] [--rounds 4] [--skip-flower] \
        [--only fresh_process worker worker_standby] [--json bench/results/<date>/deploy_message.json] \
        [overrides ...]

The CPU is shared with whatever else runs: the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, child_env, compose

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

PARTS = r"""
import json, sys, time
t0 = time.perf_counter()
import fedlora.flower.client_app  # noqa: F401  (what flwr-clientapp loads)
import fedlora.flower.node_worker  # noqa: F401  (what answering in-process adds: torch, the runtime)
from fedlora.config.settings import Settings
from fedlora.runtime.training.local import train_steps
from fedlora.runtime.training.workspace import Workspace
t1 = time.perf_counter()
run = Settings.from_config(json.loads(sys.argv[1]))
ws = Workspace(run.workspace_key())
t2 = time.perf_counter()
times = []
for _ in range(2):
    start = time.perf_counter()
    ws.host.activate(8)
    params = ws.host.set_trainable(8, True)
    train_steps(ws.host.model, params, ws.data, ws.partition(0), run.train, seed=1)
    times.append(time.perf_counter() - start)
print(json.dumps({"import": t1 - t0, "workspace": t2 - t1, "train": times[0], "train_again": times[1]}))
"""

IMPORT = r"""
import sys, time
{before}
t0 = time.perf_counter()
import {module}  # noqa: F401
heavy = [m for m in ("torch", "transformers", "peft") if m in sys.modules]
print(time.perf_counter() - t0, ",".join(heavy) or "-")
"""


def _median_runs(command: list[str], env: dict[str, str], repeat: int) -> list[str]:
    return [subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout.strip()
            for _ in range(repeat)]


def measure_parts(cfg: dict, repeat: int) -> dict[str, Any]:
    """Medians over ``repeat`` fresh processes (one torch thread each)."""
    env = {**child_env(), **ONE_THREAD}
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PARTS, json.dumps(cfg)], capture_output=True, text=True,
                             env=env, check=True)
        parts = json.loads(out.stdout.strip().splitlines()[-1])
        parts["process"] = time.perf_counter() - t0
        runs.append(parts)
    result: dict[str, Any] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    flwr_loaded = "import flwr.supernode.cli.flwr_clientapp, flwr.app, flwr.clientapp, flwr.supercore.utils"
    for name, module, before in (
            ("import_flwr_clientapp", "flwr.supernode.cli.flwr_clientapp", ""),  # Flower's own, every message
            ("import_forwarding_clientapp", "fedlora.flower.client_app", ""),  # fedlora's ClientApp, flwr included
            ("import_forwarding_clientapp_after_flwr", "fedlora.flower.client_app", flwr_loaded)):  # what it adds
        outs = _median_runs([sys.executable, "-c", IMPORT.format(module=module, before=before)], env, repeat)
        result[name] = statistics.median(float(o.split()[0]) for o in outs)
        result[name + "_loads"] = outs[0].split()[1]
    return result


class Stamped:
    """Time-stamp the lines of a growing log file as they appear (polled every 20 ms)."""

    def __init__(self, path: Path) -> None:
        self.path, self.lines = path, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pos, rest = 0, ""
        while not self._stop.is_set():
            if self.path.exists():
                with self.path.open() as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                now = time.monotonic()
                *full, rest = (rest + chunk).split("\n")
                self.lines += [(now, line) for line in full]
            time.sleep(0.02)

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join()
        return self.lines


def _rss_by_command(roots: list[int], extra: list[Any]) -> dict[str, float]:
    """Resident memory (MiB) of the node's processes after its run, summed per program: the SuperNode
    (or fedlora-supernode), its SuperExec and standby, the node worker (the workers are detached)."""
    import psutil  # noqa: PLC0415

    procs = [p for pid in roots for p in [psutil.Process(pid)] for p in [p, *p.children(recursive=True)]]
    out: dict[str, float] = {}
    for proc in [*procs, *extra]:
        try:
            cmd = proc.cmdline()
            if "fedlora.flower.node_worker" in cmd:
                name = "node worker"
            elif "-c" in cmd:  # fedlora-superexec's standby
                name = "standby flwr-clientapp"
            else:  # python3 <script> ...: the script's name
                name = Path(cmd[1] if len(cmd) > 1 and "python" in Path(cmd[0]).name else cmd[0]).name
            out[name] = round(out.get(name, 0.0) + proc.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            continue
    return out


def measure_flower(overrides: list[str], rounds: int, worker: bool, root: Path, standby: bool = True) -> dict[str, Any]:
    """One deployed run on a local SuperLink and SuperNode; the per-message figures of its training messages."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from flower_cluster import LocalCluster  # noqa: PLC0415 - the tests' cluster: free ports, kill by PID

    cluster = LocalCluster(root, standby=standby)
    try:
        cluster.start_superlink()
        cluster.start_supernode("node", "partition-id=0")
        stamped = Stamped(cluster.logs / "node.log")
        run_dir = root / "run"
        command = cluster.deploy_command([*overrides, "num_clients=1", f"num_rounds={rounds}", "connect_timeout=300"],
                                         run_dir)
        if not worker:
            command.insert(1, "--no-node-worker")
        deploy = cluster.spawn("deploy", command)
        deploy.wait(timeout=3600)
        time.sleep(0.5)
        lines = stamped.stop()
        assert deploy.returncode == 0, cluster.log("deploy")[-3000:]
        worker_log = ""
        workers = cluster.node_workers("node") if worker else []
        if worker:
            worker_log = cluster.worker_log(workers[0]).read_text() if workers else ""
        node_rss = _rss_by_command([cluster.procs["node"].pid], workers)
    finally:
        cluster.close()
    received = [t for t, line in lines if "Receiving: train message" in line]
    sent = [t for t, line in lines if "Sending: train message" in line]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    train_seconds = [row["clients"][0]["train_seconds"] for row in rows]
    node_seconds = [b - a for a, b in zip(received, sent, strict=True)]
    overhead = [n - t for n, t in zip(node_seconds, train_seconds, strict=True)]
    out: dict[str, Any] = {"node_rss_mib_after_run": node_rss, "node_seconds": node_seconds,
                           "train_seconds": train_seconds, "overhead": overhead,
                           "overhead_median": statistics.median(overhead)}
    if worker:
        handled = [float(s) for s in re.findall(r"\] train \(run \d+\): ok in ([0-9.]+) s", worker_log)]
        out["worker_seconds"] = handled
        out["worker_outside_training"] = [h - t for h, t in zip(handled, train_seconds, strict=True)]
        out["outside_worker"] = [n - h for n, h in zip(node_seconds, handled, strict=True)]
        out["outside_worker_median"] = statistics.median(out["outside_worker"])
        out["fallbacks"] = sum("training in this flwr-clientapp process" in line for _, line in lines)
        forwarded = [(float(a), float(b)) for _, line in lines for a, b in
                     re.findall(r"fedlora: train answered by the node worker in ([0-9.]+) s \(([0-9.]+) s", line)]
        out["forwarder_seconds"] = [a for a, _ in forwarded]  # in the ClientApp: frames, socket, the worker
        out["forwarding_outside_worker"] = [a - b for a, b in forwarded]  # frames and socket only
        out["flower_part"] = [n - a for n, (a, _) in zip(node_seconds, forwarded, strict=True)]
        out["flower_part_median"] = statistics.median(out["flower_part"])
        # Flower's part in three pieces, from the time stamps of the node's log lines: the SuperNode
        # fetching the message from the SuperLink ("Receiving" to "Received successfully"), the
        # ClientApp getting it and starting its handler (the process start and imports, unless a
        # standby did them before; the pull from the SuperNode; the FAB; loading the ClientApp), and
        # the reply's way back into the SuperNode until it logs "Sending"
        downloaded = [next(t for t, line in lines if t >= r and "Received successfully" in line) for r in received]
        answered = [t for t, line in lines if "fedlora: train answered by the node worker in" in line]
        started = [t - a for t, (a, _) in zip(answered, forwarded, strict=True)]
        out["supernode_download"] = [d - r for r, d in zip(received, downloaded, strict=True)]
        out["clientapp_until_handler"] = [h - d for d, h in zip(downloaded, started, strict=True)]
        out["reply_until_sending"] = [s - a for a, s in zip(answered, sent, strict=True)]
    return out


def main() -> None:
    """Print (and optionally save) the figures for the default config plus ``overrides``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per measured part")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each deployed run")
    parser.add_argument("--skip-flower", action="store_true", help="only the parts (no SuperLink/SuperNode)")
    parser.add_argument("--only", nargs="+", choices=["fresh_process", "worker", "worker_standby"], default=None,
                        help="deployed variants to run (default: all three)")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.update(ONE_THREAD)  # the SuperNode and its processes inherit it, as in the tests
    load = [os.getloadavg()[0]]
    result: dict[str, Any] = {"overrides": args.overrides, "repeat": args.repeat, "cpus": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    parts = measure_parts(compose(args.overrides), args.repeat) if args.repeat > 0 else {}
    result["parts"] = parts
    load.append(os.getloadavg()[0])
    print(f"fresh processes (median of {args.repeat}, 1 torch thread), overrides {args.overrides or 'none'}:")
    for key, value in parts.items():
        print(f"  {key:34s} {value:7.2f} s" if isinstance(value, float) else f"  {key:34s} {value}")
    if not args.skip_flower:
        # before: a fresh process per message; then the node worker behind Flower's own SuperExec
        # (subprocess isolation); after: the worker behind fedlora-superexec (process isolation)
        for name, worker, standby in (("fresh_process", False, False), ("worker", True, False),
                                      ("worker_standby", True, True)):
            if args.only and name not in args.only:
                continue
            with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as tmp:
                figures = measure_flower(args.overrides, args.rounds, worker, Path(tmp), standby=standby)
                result[name] = figures
                load.append(os.getloadavg()[0])
                print(f"deployed on 127.0.0.1, {name}: per training message, SuperNode receive->send minus "
                      f"train_seconds: {', '.join(f'{v:.2f}' for v in figures['overhead'])} s "
                      f"(median {figures['overhead_median']:.2f} s); training itself "
                      f"{', '.join(f'{v:.2f}' for v in figures['train_seconds'])} s")
                print(f"  the node's resident memory after the run, MiB: {figures['node_rss_mib_after_run']}")
                if worker:
                    print(f"  outside the worker's request (Flower + forwarding): median "
                          f"{figures['outside_worker_median']:.2f} s; of it Flower's (node time minus the "
                          f"ClientApp's handler, which includes importing nothing): median "
                          f"{figures['flower_part_median']:.2f} s; forwarding outside the worker "
                          f"{', '.join(f'{v:.3f}' for v in figures['forwarding_outside_worker'])} s; "
                          f"fallbacks {figures['fallbacks']}")
                    for key in ("supernode_download", "clientapp_until_handler", "reply_until_sending"):
                        print(f"  of Flower's: {key} {', '.join(f'{v:.2f}' for v in figures[key])} s "
                              f"(median {statistics.median(figures[key]):.2f} s)")
    result["load_average_1min"] = load
    print(f"load average (1 min) during the measurements: {', '.join(f'{v:.1f}' for v in load)} "
          f"on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
