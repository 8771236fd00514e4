"""What a deployed node pays per message for starting afresh, against training alone.

In a deployment (Flower 1.41) every message is handled by a new ``flwr-clientapp`` process
(docs/deployment.md), so each round, on each node, the Python imports, the base model and the
tokenized data come back on top of the training steps. In simulation a Ray actor builds them
once and reuses them for every client and round. This script measures both parts in a fresh
process, the way a node's ``flwr-clientapp`` starts (one torch thread, as one simulated client):

* ``import``: importing the ClientApp module (flwr, torch, the fedlora glue);
* ``workspace``: building the per-process workspace of the config (tokenizer, tokenization of
  the corpus, the base model with peft) — what the simulation's cache saves;
* ``train`` (cold) and ``train again`` (warm, same process): one client's round of local steps.

Flower's own per-message work (starting ``flwr-clientapp``, the Runtime API round trips) is not
included: the figures are a lower bound of the per-message cost of a deployment.

    PYTHONPATH=. python bench/deploy_message.py [--repeat 3] [--json out.json] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import child_env, compose

WORKER = r"""
import json, sys, time
t0 = time.perf_counter()
import fedlora.flower.client_app  # noqa: F401  (flwr, torch and the glue, as flwr-clientapp imports them)
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


def measure(cfg: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each part over ``repeat`` fresh processes (one torch thread each)."""
    env = {**child_env(), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(cfg)], capture_output=True, text=True,
                             env=env, check=True)
        parts = json.loads(out.stdout.strip().splitlines()[-1])
        parts["process"] = time.perf_counter() - t0
        runs.append(parts)
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    """Print (and optionally save) the medians for the default config plus ``overrides``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    result = measure(compose(args.overrides), args.repeat)
    result["load_average_1min"] = max(load_before, os.getloadavg()[0])
    per_message = result["import"] + result["workspace"]
    print(f"median of {args.repeat} fresh processes (1 thread), overrides {args.overrides or 'none'}, "
          f"load average up to {result['load_average_1min']:.1f} on {os.cpu_count()} CPUs:")
    for key in ("import", "workspace", "train", "train_again", "process"):
        print(f"  {key:12s} {result[key]:7.2f} s")
    print(f"  a deployed node pays {per_message:.2f} s per message for import + workspace, "
          f"{per_message / result['train_again']:.1f}x one warm round of training")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"overrides": args.overrides, "repeat": args.repeat, **result}, f, indent=2)


if __name__ == "__main__":
    main()
