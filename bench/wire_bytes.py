"""Bytes on the wire of one client's reply, plain and ComPEFT-compressed, against the coded data alone.

For the default task's adapter (the real all-MiniLM-L6-v2 with LoRA on query and value, its
5-label head; shapes read from the loaded model) at each rank and density: the reply's size as
Flower serializes it (``fedlora.flower.records.content_bytes``, what ``metrics.jsonl`` records as
``bytes_up``), uncompressed and compressed, and the coded data alone (positions, signs, scales:
the payload without headers, length tables or framing). The update is Gaussian; what is measured
is the format, whose size does not depend on the values beyond the kept share.

    PYTHONPATH=. .venv/bin/python bench/wire_bytes.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

from bench.common import ROOT

RANKS = (2, 4, 8, 16)
DENSITIES = (0.05, 0.1, 0.2)
HEADER_FIELDS = ("hdr",)  # per-tensor metadata in ComPEFT's payload (the rest is coded data)


def adapter_shapes() -> dict[str, tuple[int, int]]:
    """The default model's adapted modules (loaded from the shipped checkpoint) and its head."""
    from fedlora.runtime.models import AdapterHost, ModelSettings  # noqa: PLC0415

    spec = AdapterHost(ModelSettings(), num_labels=5, seed=0).spec(16)
    shapes = {name: tuple(t.shape) for name, t in spec.head.items()}
    return {"modules": spec.modules, "head": shapes}  # type: ignore[return-value]


def update(shapes: dict, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (m, n) in shapes["modules"].items():
        state[f"{module}.lora_A.weight"] = torch.randn(rank, n, generator=g)
        state[f"{module}.lora_B.weight"] = torch.randn(m, rank, generator=g)
    for name, shape in shapes["head"].items():
        state[name] = torch.randn(*shape, generator=g)
    return state


def measure() -> dict:
    from fedlora.compression.compeft import ComPEFT  # noqa: PLC0415
    from fedlora.federation import wire  # noqa: PLC0415
    from fedlora.flower.records import content_bytes, to_content  # noqa: PLC0415

    shapes = adapter_shapes()
    report = wire.Report(num_examples=178, train_loss=1.0, train_seconds=1.0, rank=8, base_version=0)
    rows = []
    for rank in RANKS:
        delta = update(shapes, rank, seed=rank)
        plain = content_bytes(to_content(wire.encode_update(delta, report)))
        for density in DENSITIES:
            payload, _ = ComPEFT(density=density).compress(delta, None)
            packet = wire.encode_compressed(payload, sorted(delta), report)
            sent = content_bytes(to_content(packet))
            coded = sum(int(a.nbytes) for k, a in payload.items() if k.rpartition("|")[2] not in HEADER_FIELDS)
            headers = sum(int(a.nbytes) for k, a in payload.items() if k.rpartition("|")[2] in HEADER_FIELDS)
            packed = sum(int(a.nbytes) for arrays in packet.arrays.values() for a in arrays.values())
            report_bytes = content_bytes(to_content(wire.Packet(metrics=packet.metrics)))
            rows.append({"rank": rank, "density": density, "tensors": len(delta), "plain_bytes": plain,
                         "compressed_bytes": sent, "coded_bytes": coded, "header_bytes": headers,
                         # what the rest of a reply is: the packed array's length table and field list, the
                         # report record (example count, loss, rank), and Flower's framing of the array
                         "length_table_bytes": packed - coded - headers, "report_bytes": report_bytes,
                         "framing_bytes": sent - packed - report_bytes,
                         "ratio_on_wire": plain / sent, "ratio_coded": plain / coded})
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    out = measure()
    out["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
    print(f"{'rank':>4} {'density':>7} {'plain B':>8} {'on wire B':>9} {'coded B':>8} {'headers B':>9} "
          f"{'lengths B':>9} {'report B':>8} {'framing B':>9} {'x on wire':>9} {'x coded':>8}")
    for r in out["rows"]:
        print(f"{r['rank']:>4} {r['density']:>7} {r['plain_bytes']:>8} {r['compressed_bytes']:>9} "
              f"{r['coded_bytes']:>8} {r['header_bytes']:>9} {r['length_table_bytes']:>9} {r['report_bytes']:>8} "
              f"{r['framing_bytes']:>9} {r['ratio_on_wire']:>9.1f} {r['ratio_coded']:>8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
