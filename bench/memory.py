"""Benchmark 2: peak memory of a whole simulation for 10, 100 and 1,000 clients, 10 sampled per round.

Each federation runs ``python -m fedlora`` as a child process while a thread samples every 0.25 s
the resident memory summed over that process and all its descendants (the driver with the
ServerApp and Flower's simulation engine, Ray's GCS, raylet and workers, the ClientApp actors):

* ``peak RSS`` (the target's measure; it counts shared pages, e.g. libtorch, once per process);
* ``peak PSS`` (shared pages divided among the processes that map them: the memory actually used).

Settings: ``partition=iid`` (1,780 training articles over 1,000 clients is 1 or 2 each; Dirichlet
cannot give every client ``min_partition_size`` examples), ``partition.min_partition_size=1``,
``fraction_train = 10 / num_clients``, 2 rounds of 2 local steps of batch 8, evaluation on 64 test
articles; everything else is the default experiment (FedAvg, hetero ranks, 1 CPU per client).
The ratio ``peak(1,000) / peak(10)`` is the headline (target <= 1.5).

What can grow with the number of clients: in the driver, Flower keeps one node record and one
``Context`` per node (``node_config`` with two integers, an empty ``RecordDict`` state, an empty
run config); fedlora's server keeps one ``ClientInfo`` (four integers) per client. The client's
``context.state`` holds data only for FLoRA (the base merges this client has applied) and ComPEFT
(its error-feedback residual), and only for clients that have trained; FedAvg stores nothing. In
every worker, the workspace holds the tokenized corpus once and one index list per partition
(``num_clients`` lists that together hold each training article once). The base model and the
adapters of each rank exist once per worker whatever the number of clients.

    PYTHONPATH=. python bench/memory.py           # 10, 100, 1000 clients (idle machine: ~3 minutes)
    PYTHONPATH=. python bench/memory.py --quick   # 10 and 100 clients, 1 round

The BBC corpus has 1,781 training articles: more clients than that is refused before Ray starts
(``num_clients=...: the training split ... holds only 1781 examples``). For 10,000 clients use the
generated instructions, ``--extra experiment=causal_demo,data.max_examples=40000``, or
``bench/clients.py`` (item 6 of bench/README.md), which also times round 0 and the rounds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, run_fedlora, warm_up, write_results  # noqa: E402


def overrides_for(num_clients: int, sampled: int, rounds: int, extra: list[str]) -> list[str]:
    return [f"num_clients={num_clients}", f"fraction_train={sampled / num_clients}", f"min_clients={sampled}",
            f"num_rounds={rounds}", "partition=iid", "partition.min_partition_size=1",
            "train.local_steps=2", "train.batch_size=8", "data.max_test_examples=64", *extra]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 10 and 100 clients, 1 round")
    ap.add_argument("--clients", default="10,100,1000")
    ap.add_argument("--sampled", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--extra", default="", help="more overrides, comma-separated (e.g. strategy=flora)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep run directories and logs here")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.rounds = "10,100", 1
    extra = [x for x in args.extra.split(",") if x]
    work = args.keep or Path(tempfile.mkdtemp(prefix="fedlora-memory-"))
    info = machine()
    print(f"# memory: {info}", flush=True)
    print(f"# warm-up: {warm_up():.1f} s (not counted)", flush=True)
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "runs": {}}
    for n in (int(x) for x in args.clients.split(",")):
        try:
            sim = run_fedlora(overrides_for(n, args.sampled, args.rounds, extra), work / f"clients_{n}" / "run",
                              memory=True)
        except RuntimeError as exc:  # e.g. more clients than training examples: refused before Ray starts
            print(f"{n:5d} clients: the run failed; the end of its log:\n{str(exc).split(chr(10), 1)[-1].strip()}",
                  file=sys.stderr)
            return 2
        rows = sim["rows"]
        row = {
            "num_clients": n, "sampled": args.sampled, "wall": sim["wall"], "peak_rss": sim["peak_rss"],
            "peak_pss": sim["peak_pss"], "procs_at_peak": sim["procs_at_peak"],
            "peak_max_process_rss": sim["peak_max_proc"], "samples": sim["samples"],
            "round_seconds": [r.get("round_seconds") for r in rows[1:]],
            "clients_per_round": [len(r["clients"]) for r in rows[1:]],
        }
        results["runs"][n] = row
        print(f"{n:5d} clients ({args.sampled} per round): peak RSS {row['peak_rss'] / 2**30:.2f} GiB "
              f"(PSS {row['peak_pss'] / 2**30:.2f} GiB, {row['procs_at_peak']} processes, largest "
              f"{row['peak_max_process_rss'] / 2**30:.2f} GiB), wall {row['wall']:.1f} s, rounds "
              f"{', '.join(f'{s:.1f}' for s in row['round_seconds'])} s", flush=True)
    runs = results["runs"]
    lo, hi = min(runs), max(runs)
    if lo != hi:
        rss, pss = runs[hi]["peak_rss"] / runs[lo]["peak_rss"], runs[hi]["peak_pss"] / runs[lo]["peak_pss"]
        results["ratio_rss"], results["ratio_pss"] = rss, pss
        print(f"peak memory {hi} / {lo} clients: RSS x{rss:.3f}, PSS x{pss:.3f} (target <= 1.5)")
    write_results(results, args.json, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
