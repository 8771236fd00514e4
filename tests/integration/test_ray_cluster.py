"""The real `fedlora` command on real Ray clusters started with `ray start` on this machine.

* Two nodes (two `ray start`: a head and a second raylet joining it, each with one CPU): a run with
  ``simulation.address`` computes exactly what the same run computes on a local Ray, its client
  actors run on both nodes (Ray's own actor table, and each actor's report of its node), they get
  the run's quiet and offline environment although the shell that started the nodes had none of it
  (read from each actor process's environment while it runs), and the console holds fedlora's lines
  and one placement line per actor, nothing else (no transformers load reports).
* A head started with ``--num-gpus=2`` on this GPU-less machine (Ray lets a node declare resources
  it lacks) and a second node without GPUs: with half a GPU per client the actor pool is
  ``min(CPUs / num_cpus, GPUs / num_gpus)`` per node, none on the GPU-less node
  (docs/scaling.md); each actor says which GPU id Ray gave it, and that it trains on the CPU since
  torch has no CUDA here.
* A head killed with SIGKILL leaves its ``ray_current_cluster`` file naming a dead cluster (and
  ``RAY_ADDRESS`` may name it too): a run without ``simulation.address`` starts a Ray of its own.
  (An unreachable ``simulation.address`` is tests/test_flower_api.py's.)

Why `ray start` twice rather than ``ray.cluster_utils.Cluster``: it is what a user types, and it
works on one host when each node gets its own ``--temp-dir`` (two nodes sharing one session log
directory would each forward every actor's output, so the driver would print every line twice).
Every Ray file lives under a short directory of the test's own (``RAY_TMPDIR``; Unix socket paths
must stay under 108 characters), every port is picked free, and the processes are ended by PID:
``ray stop`` ends every Ray process of the user on the machine, other people's runs included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import FEDLORA, ROOT, jsonl_rows, untimed
from flower_cluster import free_port

from fedlora.core import env as run_env
from fedlora.flower.actors import ACTOR_TITLE, PLACEMENT_PREFIX

RAY = str(Path(sys.executable).parent / "ray")
SMOKE = ["experiment=smoke"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
# What the actor table says, read by a driver of its own (the table Ray's GCS keeps; Ray's state API
# would need the dashboard, which ray[default] brings and this environment does not have).
ACTOR_TABLE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
from ray._private import state
nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
actors = [{"class": a["ActorClassName"], "pid": a["Pid"], "node": a["Address"]["NodeID"], "job": a["JobID"]}
          for a in state.actors().values()]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""
PLACEMENT = re.compile(r"^\(ClientAppActor pid=(\d+)(?:, ip=\S+)?\) " + PLACEMENT_PREFIX +
                       r" pid (\d+) on node ([0-9a-f]+) \(\S+\): GPU ids \[([^\]]*)\] "
                       r"\(CUDA_VISIBLE_DEVICES=(\S+)\), (\d+) torch threads -> device (\S+)$")
FALLBACK = re.compile(r"^\(ClientAppActor pid=(\d+)(?:, ip=\S+)?\) pid (\d+) was given GPU (\S+) "
                      r"\(CUDA_VISIBLE_DEVICES\) but torch \S+ cannot use it \(a CPU-only build\): "
                      r"model.device=auto falls back to the CPU$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def user_shell() -> dict[str, str]:
    """The environment of a user's shell: none of the quiet or offline settings a run applies to itself."""
    drop = set(run_env.QUIET) | set(OFFLINE) | {"RAY_ADDRESS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


class RayCluster:
    """Nodes started with `ray start` under ``root``; :meth:`kill` ends their processes by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**user_shell(), "RAY_TMPDIR": str(root)}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes = 0

    def start(self, num_cpus: int, num_gpus: int = 0) -> None:
        """The head first, then each further node joins it (its own temp dir, its own agent port).

        The head's temp dir is the default one under ``RAY_TMPDIR`` (``ray``), where its
        ``ray_current_cluster`` file names the cluster to a driver that looks for one.
        """
        where = ([f"--address={self.address}"] if self.nodes else
                 ["--head", f"--port={self.port}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                  f"--ray-client-server-port={free_port()}"])
        cmd = [RAY, "start", *where, "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               f"--num-gpus={num_gpus}", f"--temp-dir={self.root}/{f'node{self.nodes}' if self.nodes else 'ray'}",
               f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=200000000",
               "--disable-usage-stats"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=self.env)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        self.nodes += 1

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its directory, and all they started."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if proc.pid != os.getpid() and any(str(self.root) in arg for arg in proc.info["cmdline"] or []):
                    for p in [proc, *proc.children(recursive=True)]:
                        found[p.pid] = p
            except psutil.Error:
                pass
        return list(found.values())

    def kill(self) -> None:
        """SIGKILL every process of the cluster, as a crash would (its files stay)."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)

    def table(self) -> dict:
        """The cluster's nodes and every actor it has run (dead ones included), from Ray's GCS."""
        out = subprocess.run([sys.executable, "-c", ACTOR_TABLE, self.address], capture_output=True, text=True,
                             timeout=120, env=self.env)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def ray_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # short: Ray's socket paths live under it
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(ray_root: Path) -> Iterator[RayCluster]:
    ray = RayCluster(ray_root)
    try:
        yield ray
    finally:
        ray.kill()


def actor_environments(cluster: RayCluster, stop: threading.Event, seen: dict[int, dict[str, str]]) -> None:
    """Until ``stop``: the environment of every client actor process of ``cluster`` (by PID)."""
    while not stop.wait(0.5):
        for proc in cluster.processes():
            try:
                if proc.pid not in seen and " ".join(proc.cmdline()[:1]).startswith(ACTOR_TITLE):
                    seen[proc.pid] = proc.environ()
            except psutil.Error:
                pass


def fedlora(args: list[str], run_dir: Path, environment: dict[str, str], timeout: int = 600
            ) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = subprocess.run([FEDLORA, *args, f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, env=environment)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out, time.monotonic() - started


def console(out: subprocess.CompletedProcess) -> list[str]:
    return [ANSI.sub("", line) for line in (out.stdout + out.stderr).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def local_run() -> Iterator[tuple[Path, float, float, list[str]]]:
    """The smoke run without an address, while a killed head's files and ``RAY_ADDRESS`` name a dead cluster.

    Also the single-node reference the cluster run is compared with. Yields the run directory, its
    wall time, when it started (``time.time()``) and the Ray session directories before the run.
    """
    root = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))
    dead = RayCluster(root)
    try:
        dead.start(num_cpus=1)
        dead.kill()
        assert not dead.processes()
        state_file = root / "ray" / "ray_current_cluster"  # RAY_TMPDIR/ray: where ray.init looks for one
        assert state_file.read_text().strip().endswith(f":{dead.port}")
        sessions = sorted(p.name for p in (root / "ray").glob("session_2*"))
        run_dir = root / "run"
        started = time.time()
        _, wall = fedlora(SMOKE, run_dir, {**user_shell(), "RAY_TMPDIR": str(root), "RAY_ADDRESS": dead.address})
        yield run_dir, wall, started, sessions
    finally:
        dead.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_a_killed_head_does_not_capture_a_run_without_an_address(local_run) -> None:  # noqa: ANN001
    run_dir, wall, started, sessions = local_run
    root = run_dir.parent
    assert [r["round"] for r in jsonl_rows(run_dir)] == [0, 1, 2]
    # It ran on a Ray of its own: a new session next to the dead head's, started within seconds of
    # the command (a driver captured by the state file retries the dead address for minutes: more
    # than 5 in `ray.init()` with this Ray; the run never gets to a session of its own).
    after = {p.name for p in (root / "ray").glob("session_2*")}
    assert (root / "ray" / "ray_current_cluster").exists() and len(sessions) == 1 and sessions[0] in after
    [new] = after - set(sessions)
    ray_after = session_start(new) - started
    assert ray_after < 120, f"{ray_after:.0f} s"
    print(f"run without an address next to a dead head: {wall:.0f} s; its own Ray after {ray_after:.0f} s")


def session_start(name: str) -> float:
    """When Ray started the session ``session_<date>_<time>_<microseconds>_<pid>`` (a Unix time)."""
    import datetime  # noqa: PLC0415

    day, clock, micro = name.split("_")[1:4]
    return datetime.datetime.strptime(f"{day} {clock}.{micro}", "%Y-%m-%d %H-%M-%S.%f").timestamp()


@pytest.mark.slow
def test_a_two_node_cluster_runs_the_same_federation_on_both_nodes(local_run, cluster: RayCluster,
                                                                   tmp_path: Path) -> None:  # noqa: ANN001
    cluster.start(num_cpus=1)
    cluster.start(num_cpus=1)  # a second raylet: a second Ray node on this host
    seen: dict[int, dict[str, str]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=actor_environments, args=(cluster, stop, seen), daemon=True)
    watcher.start()
    try:
        out, wall = fedlora([*SMOKE, f"simulation.address={cluster.address}"], tmp_path / "run",
                            {**user_shell(), "RAY_TMPDIR": str(cluster.root)})
    finally:
        stop.set()
        watcher.join(timeout=10)
    # the same numbers as on a single local node
    assert untimed(jsonl_rows(tmp_path / "run")) == untimed(jsonl_rows(local_run[0]))
    # Ray's actor table: one client actor per node (1 CPU each, 1 CPU per client)
    table = cluster.table()
    nodes = {n["id"] for n in table["nodes"] if n["alive"]}
    clients = [a for a in table["actors"] if a["class"] == "ClientAppActor"]
    assert len(nodes) == 2 and {a["node"] for a in clients} == nodes and len(clients) == 2
    # each actor said where it runs, and the actor table agrees
    lines = console(out)
    reports = [m for m in map(PLACEMENT.match, lines) if m]
    assert {(int(m[2]), m[3]) for m in reports} == {(a["pid"], a["node"]) for a in clients}
    assert all(m[4] == "" and m[6] == "1" and m[7] == "cpu" for m in reports)
    # the run's quiet and offline settings reached the actors on both nodes; the nodes' shell had none
    assert not {k for k in OFFLINE if k in cluster.env}
    for actor in clients:
        assert {k: seen[actor["pid"]].get(k) for k in OFFLINE} == OFFLINE, actor
    # the console: fedlora's lines and one placement line per actor, nothing else (no load reports)
    other = [line for line in lines if not line.startswith("[fedlora]") and not PLACEMENT.match(line)]
    assert other == [], other
    assert len(reports) == 2
    print(f"cluster run {wall:.0f} s, local run {local_run[1]:.0f} s; {len(lines)} console lines")


@pytest.mark.slow
def test_fake_gpus_bound_the_actor_pool_and_each_actor_says_its_gpu(cluster: RayCluster, tmp_path: Path) -> None:
    cluster.start(num_cpus=6, num_gpus=2)  # GPUs this machine does not have: Ray takes the declaration
    cluster.start(num_cpus=2)  # a node without GPUs
    resources = ["simulation=gpu", "simulation.client_resources.num_cpus=1", "simulation.client_resources.num_gpus=0.5"]
    out, wall = fedlora([*SMOKE, "num_clients=4", "num_rounds=1", *resources, f"simulation.address={cluster.address}"],
                        tmp_path / "run", {**user_shell(), "RAY_TMPDIR": str(cluster.root)})
    rows = jsonl_rows(tmp_path / "run")
    assert rows[-1]["round"] == 1 and rows[-1]["num_ok"] == 4
    table = cluster.table()
    gpu_node = next(n["id"] for n in table["nodes"] if n["resources"].get("GPU") == 2)
    # docs/scaling.md: min(CPUs / num_cpus, GPUs / num_gpus) per node, none on a node without GPUs
    expected = min(int(6 / 1), int(2 / 0.5)) + 0
    clients = [a for a in table["actors"] if a["class"] == "ClientAppActor"]
    assert len(clients) == expected == 4 and {a["node"] for a in clients} == {gpu_node}
    lines = console(out)
    reports = {int(m[2]): m for m in map(PLACEMENT.match, lines) if m}
    assert set(reports) == {a["pid"] for a in clients}  # 4 clients: every actor took one
    gpu_ids = sorted(m[4] for m in reports.values())
    assert gpu_ids == ["0", "0", "1", "1"], gpu_ids  # half a GPU each: two actors per GPU
    assert all(m[5] == m[4] and m[6] == "1" and m[7] == "cpu" for m in reports.values())
    # no CUDA in this torch: each actor says once that it falls back to the CPU
    fallbacks = [m for m in map(FALLBACK.match, lines) if m]
    assert sorted(int(m[2]) for m in fallbacks) == sorted(reports)
    assert {int(m[2]): m[3] for m in fallbacks} == {pid: m[4] for pid, m in reports.items()}
    other = [line for line in lines if not line.startswith("[fedlora]") and not PLACEMENT.match(line)
             and not FALLBACK.match(line)]
    assert other == [], other
    print(f"GPU run {wall:.0f} s; pool {len(clients)}, GPU ids {gpu_ids}; {len(lines)} console lines")


def test_placement_is_reported_on_a_cluster_and_with_gpus_only() -> None:
    from conftest import compose

    from fedlora.config.settings import Settings
    from fedlora.flower.actors import PLACEMENT_VARIABLE
    from fedlora.flower.simulation import placement_report

    def report(overrides: list[str]) -> dict[str, str]:
        return placement_report(Settings.from_config(compose(overrides)))

    assert report([]) == {}  # a local CPU run stays quiet
    assert report(["simulation.address=127.0.0.1:6379"]) == {PLACEMENT_VARIABLE: "auto"}
    assert report(["simulation=gpu", "+model.device=cpu"]) == {PLACEMENT_VARIABLE: "cpu"}


def test_a_gpu_torch_cannot_use_falls_back_to_the_cpu_with_one_line(monkeypatch, caplog) -> None:  # noqa: ANN001
    import torch

    from fedlora.runtime import models

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_GPU_FALLBACK_SAID", [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert models.pick_device("auto") == torch.device("cpu") and not caplog.records  # no GPU given: silent
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    for _ in range(3):
        assert models.pick_device("auto") == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == [
        f"pid {os.getpid()} was given GPU 1 (CUDA_VISIBLE_DEVICES) but torch {torch.__version__} cannot use it "
        f"({'a CPU-only build' if torch.version.cuda is None else 'no CUDA driver or device is visible'}): "
        "model.device=auto falls back to the CPU"]
    assert models.pick_device("cpu") == torch.device("cpu")
