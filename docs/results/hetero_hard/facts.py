"""Figures that docs/results.md quotes from the committed hetero_hard records (run from the repository root):

    python docs/results/hetero_hard/facts.py

Per seed: FedAvg's mean share of a round's update in the rank slot every client shares (`shared_slot_energy`),
the HetLoRA clients that pruned (client: its lowest rank) against their configured tier, the largest one-round
drop of test accuracy (and its round) for three strategies, and the clients' training-set sizes (each client's
`num_examples` as FedAvg's rounds report it).
"""

import glob
import json

RUNS = "docs/results/hetero_hard/runs"
TIERS = [1, 2, 1, 2, 1, 2, 1, 2, 32, 64]  # conf/experiment/hetero_hard.yaml: client k gets TIERS[k % 10]


def rows(seed: int, strategy: str) -> list[dict]:
    (path,) = glob.glob(f"{RUNS}/seed{seed}/{strategy}/*/metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


for seed in range(3):
    fedavg = rows(seed, "fedavg")[1:]
    energy = [r["shared_slot_energy"] for r in fedavg]
    pruned: dict[int, int] = {}
    for r in rows(seed, "hetlora")[1:]:
        for c in r["clients"]:
            if c.get("rank") is not None and c["rank"] < TIERS[c["client"] % 10]:
                pruned[c["client"]] = min(pruned.get(c["client"], c["rank"]), c["rank"])
    drops = {}
    for s in ("lora_fair", "flexlora", "flora"):
        acc = [r["test_accuracy"] for r in rows(seed, s)]
        drop, rnd = max((acc[i - 1] - acc[i], i) for i in range(1, len(acc)))
        drops[s] = f"{drop:.3f} (round {rnd})"
    sizes = {c["client"]: c["num_examples"] for r in fedavg for c in r["clients"] if c.get("num_examples")}
    print(f"seed {seed}: FedAvg shared_slot_energy mean {sum(energy) / len(energy):.3f}; HetLoRA pruned {pruned}; "
          f"largest one-round drop {drops}; training examples of the {len(sizes)} clients FedAvg sampled: "
          f"mean {sum(sizes.values()) / len(sizes):.1f}, min {min(sizes.values())}")
