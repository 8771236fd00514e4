"""Record the golden runs: tiny runs of every strategy whose metrics.jsonl must never change.

    .venv/bin/python tests/golden/record.py            # all cases, into tests/golden/<case>.json
    .venv/bin/python tests/golden/record.py fedavg     # one case

Each case is the tiny end-to-end setting of the tests (3 clients with ranks 2/4/8, 2 rounds of 2
local steps, 64 test articles) with one strategy (and compression). The file keeps the run's
``metrics.jsonl`` without its wall-clock fields, the saved adapter's SHA-256, and the torch
version, CPU capability and kernel-relevant CPU flags it was recorded with (floating-point results are
reproducible on the same kind of machine, not across instruction sets). ``tests/integration/test_golden.py`` runs the
same commands and compares (five of the cases on the identical runs that tests/integration/test_e2e.py makes).
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


# CPU features that change which kernels MKL and oneDNN pick for fp32 (seen: the same torch build with
# AVX512 gives other last bits on a CPU with AMX, 2026-12-04)
_KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile")


def _cpu_flags() -> list[str]:
    """The :data:`_KERNEL_FLAGS` this CPU has (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in _KERNEL_FLAGS if f in flags]


def machine() -> dict[str, object]:
    """What floating-point results depend on: the torch build and the CPU kernels it picks."""
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_flags": _cpu_flags()}


def run_case(name: str, run_dir: Path) -> dict:
    """Run one case with the real ``fedlora`` command; return what the golden file keeps."""
    exe = str(Path(sys.executable).parent / "fedlora")
    out = subprocess.run([exe, *ARGS, *CASES[name], f"hydra.run.dir={run_dir}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return record_of(name, run_dir)


def record_of(name: str, run_dir: Path) -> dict:
    """What the golden file of case ``name`` keeps, read from a finished run of it in ``run_dir``."""
    adapter = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    return {"case": name, "args": [*ARGS, *CASES[name]], "machine": machine(),
            "adapter_sha256": hashlib.sha256(adapter).hexdigest(), "metrics": untimed(jsonl_rows(run_dir))}


def main(names: list[str]) -> None:
    for name in names or list(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            record = run_case(name, Path(tmp) / "run")
        sys.path.insert(0, str(ROOT / "tests" / "integration"))
        from test_golden import approx_equal, without_pooled_learner, without_slot_energy  # noqa: PLC0415

        # kept as the test compares them: the diagnostics added since the first recording checked and set aside
        rows = without_slot_energy(record["metrics"], name)
        record["metrics"] = without_pooled_learner(rows) if name == "centralized" else rows
        if (HERE / f"{name}.json").exists():  # a re-recording on another machine may change last bits only
            problems = approx_equal(record["metrics"], json.loads((HERE / f"{name}.json").read_text())["metrics"],
                                    compressed="compeft" in name)
            if problems:
                raise SystemExit(f"{name}: the new record differs beyond float rounding: {problems[:5]}")
        (HERE / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"{name}: {[r.get('test_accuracy') for r in record['metrics']]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
