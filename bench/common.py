"""Shared helpers of the benchmarks: config composition, running ``fedlora`` in a subprocess,
sampling the memory of a process tree, describing the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = str(ROOT / "conf")
# The smoke settings of tests/conftest.py (experiment=smoke without its num_rounds).
QUICK = ["num_clients=3", "train.local_steps=2", "train.batch_size=8", "data.max_test_examples=64",
         "ranks.tiers=[2,4,8]", "partition.min_partition_size=5"]


def compose(overrides: list[str]) -> dict[str, Any]:
    """Compose ``conf/`` with ``overrides`` and return the resolved config as a plain dict."""
    from hydra import compose as hydra_compose  # noqa: PLC0415
    from hydra import initialize_config_dir  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
        OmegaConf.set_struct(cfg, False)
        cfg.name = cfg.hydra.runtime.choices.get("strategy")
        del cfg["hydra"]
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def child_env() -> dict[str, str]:
    """Environment of a child process: this checkout first on the import path, quiet and offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
        env.setdefault(key, value)
    return env


class TreeMemory:
    """Sample the summed RSS (and PSS) of a process and all its descendants in a thread."""

    def __init__(self, pid: int, interval: float = 0.25, pss: bool = True) -> None:
        self.pid, self.interval, self.pss = pid, interval, pss
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.peak_max_proc = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil  # noqa: PLC0415

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = pss = biggest = 0
            for proc in procs:
                try:
                    if self.pss:
                        info = proc.memory_full_info()
                        pss += info.pss
                    else:
                        info = proc.memory_info()
                    rss += info.rss
                    biggest = max(biggest, info.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.samples += 1
            if rss > self.peak_rss:
                self.peak_rss, self.peak_procs = rss, len(procs)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_max_proc = max(self.peak_max_proc, biggest)
            self._stop.wait(self.interval)


def fedlora_command(overrides: list[str], run_dir: Path) -> tuple[list[str], Path]:
    """The command that runs ``python -m fedlora <overrides>`` into ``run_dir``, and its log file's path."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "fedlora", *overrides, f"hydra.run.dir={run_dir}"], run_dir.with_suffix(".log")


def write_results(results: dict[str, Any], path: Path | None, work: Path | str) -> None:
    """Write a benchmark's results as JSON (when ``path`` is given) and say where its runs are."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
    print(f"# run directories and logs: {work}")


def run_fedlora(overrides: list[str], run_dir: Path, *, memory: bool = False,
                timeout: float | None = None) -> dict[str, Any]:
    """Run ``python -m fedlora <overrides>`` to completion; return wall time, outputs, memory."""
    cmd, log_path = fedlora_command(overrides, run_dir)
    with log_path.open("w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        mem = TreeMemory(proc.pid) if memory else None
        if mem:
            mem.__enter__()
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            if mem:
                mem.__exit__(None, None, None)
        wall = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"fedlora exited with {rc}: {' '.join(cmd)}\n{tail}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    out: dict[str, Any] = {"wall": wall, "rows": rows, "summary": summary, "log": str(log_path)}
    if mem:
        out.update(peak_rss=mem.peak_rss, peak_pss=mem.peak_pss, procs_at_peak=mem.peak_procs,
                   peak_max_proc=mem.peak_max_proc, samples=mem.samples)
    return out


def machine() -> dict[str, Any]:
    """Describe this machine: CPU model and count, memory, load, Python and torch versions."""
    import psutil  # noqa: PLC0415

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version(),
            "platform": platform.platform()}


def warm_up() -> float:
    """Import the stack and read the model files once (page cache), so no timed run starts cold."""
    code = ("from fedlora.core import env; env.apply(); "
            "from fedlora.runtime.models import load_base_model, load_tokenizer; "
            "load_tokenizer('all-MiniLM-L6-v2'); load_base_model('all-MiniLM-L6-v2', 5, 0); "
            "import ray, flwr, datasets, flwr_datasets")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), check=True)
    return time.perf_counter() - t0
