"""Record the golden runs: tiny runs of every strategy whose metrics.jsonl must never change.

    .venv/bin/python tests/golden/record.py            # all cases, into tests/golden/<case>.json
    .venv/bin/python tests/golden/record.py fedavg     # one case

Each case is the tiny end-to-end setting of the tests (3 clients with ranks 2/4/8, 2 rounds of 2
local steps, 64 test articles) with one strategy (and compression). The file keeps the run's
``metrics.jsonl`` without its wall-clock fields, the saved adapter's SHA-256, and the torch
version and CPU capability it was recorded with (floating-point results are reproducible on the
same kind of machine, not across instruction sets). ``tests/integration/test_golden.py`` runs the
same commands and compares.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TINY, jsonl_rows, untimed  # noqa: E402

CASES = {
    "fedavg": ["strategy=fedavg"],
    "flora": ["strategy=flora"],
    "ffa_lora": ["strategy=ffa_lora"],
    "lora_fair": ["strategy=lora_fair"],
    "centralized": ["strategy=centralized"],
    "fedavg_compeft": ["strategy=fedavg", "compression=compeft"],
    "flora_compeft": ["strategy=flora", "compression=compeft"],
}
ARGS = [*TINY, "logging.tensorboard=false"]


def machine() -> dict[str, str]:
    """What floating-point results depend on: the torch build and the CPU kernels it picks."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run_case(name: str, run_dir: Path) -> dict:
    """Run one case with the real ``fedlora`` command; return what the golden file keeps."""
    exe = str(Path(sys.executable).parent / "fedlora")
    out = subprocess.run([exe, *ARGS, *CASES[name], f"hydra.run.dir={run_dir}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    return {"case": name, "args": [*ARGS, *CASES[name]], "machine": machine(),
            "adapter_sha256": hashlib.sha256(adapter).hexdigest(), "metrics": untimed(jsonl_rows(run_dir))}


def main(names: list[str]) -> None:
    for name in names or list(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            record = run_case(name, Path(tmp) / "run")
        (HERE / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {[r.get('test_accuracy') for r in record['metrics']]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
