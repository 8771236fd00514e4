"""A real Flower deployment on 127.0.0.1 for tests: SuperLink, SuperNodes, `fedlora-deploy`.

:meth:`LocalCluster.close` kills every process a test started, by PID (SIGKILL), together with
the processes they spawned (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``; the SuperLink
starts its SuperExec in a session of its own, so a process group would miss it) and the fedlora
node workers their ClientApps started (detached, in sessions of their own: found by the
SuperExec they watch), whatever state the test left them in. Ports are picked free at runtime;
``FLWR_HOME``, certificates and logs live in the test's ``tmp_path`` (a node worker's socket and
log in ``$TMPDIR/fedlora-<uid>/``).

Every process runs with one torch thread (``OMP_NUM_THREADS=1``), as each simulated client does
(Ray sets it from ``num_cpus=1``), so that a deployed run computes exactly what the same run
computes in simulation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Wait until something accepts connections on ``port`` (fail if ``proc`` dies first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s:\n{log.read_text()[-3000:]}")


class LocalCluster:
    """SuperLink and SuperNodes as real processes; ``close()`` kills them all by PID."""

    def __init__(self, root: Path, *, tls: bool = False, auth: bool = False, standby: bool = True,
                 node_keys: int = 2) -> None:
        self.root = root
        self.node_keys = node_keys  # with TLS: node-1.key ... node-<n>.key (and .pub) are created
        self.home = root / "flwr_home"
        self.certs = root / "certs"
        self.logs = root / "logs"
        for directory in (self.home, self.logs):
            directory.mkdir(parents=True, exist_ok=True)
        self.tls, self.auth = tls, auth
        self.standby = standby  # SuperNodes started with fedlora-supernode (docs/deployment.md), not flower-supernode
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # Flower starts flower-superexec by name
        self.env = {**os.environ, **ONE_THREAD, "FLWR_HOME": str(self.home), "PATH": path}
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()

    # -- processes --------------------------------------------------------------------------------
    def spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start ``command`` in its own session (pytest's Ctrl-C is not theirs), output to ``logs/<name>.log``."""
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        """What process ``name`` printed so far."""
        return (self.logs / f"{name}.log").read_text()

    def kill(self, name: str) -> None:
        """SIGKILL process ``name`` and every process it started, each by its PID."""
        proc = self.procs[name]
        if proc.poll() is None:  # alive (not reaped): its PID is still its own
            family = [proc.pid]
            try:
                family += [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
            for pid in family:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=30)

    def close(self) -> None:
        """Kill every process this cluster started that is still running, with its children and node workers."""
        workers = [w for name in self.procs for w in self.node_workers(name)]
        for name in list(self.procs):
            self.kill(name)
        for worker in workers:  # they exit by themselves within ~1 s of their SuperExec; do not wait for it
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass

    def node_workers(self, name: str) -> list[psutil.Process]:
        """The fedlora node workers serving SuperNode ``name`` (they watch its SuperExec's PID)."""
        proc = self.procs[name]
        if proc.poll() is not None:
            return []
        try:
            family = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return []
        found = []
        for candidate in psutil.process_iter(["cmdline"]):
            cmd = candidate.info["cmdline"] or []
            if "fedlora.flower.node_worker" in cmd and "--watch-pid" in cmd:
                with contextlib.suppress(ValueError, IndexError):
                    if int(cmd[cmd.index("--watch-pid") + 1]) in family:
                        found.append(candidate)
        return found

    @staticmethod
    def worker_log(worker: psutil.Process) -> Path:
        """The log of a node worker (every worker at that socket appends to it)."""
        cmd = worker.cmdline()
        return Path(cmd[cmd.index("--socket") + 1] + ".log")

    # -- Flower -------------------------------------------------------------------------------------
    def start_superlink(self) -> None:
        """Start the SuperLink (TLS and node authentication as configured) and write config.toml."""
        if self.tls:
            from fedlora.cli import certs

            certs.create(self.certs, nodes=self.node_keys, names=[], days=1)
            security = ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile",
                        str(self.certs / "server.crt"), "--ssl-keyfile", str(self.certs / "server.key")]
        else:
            security = ["--insecure"]
        if self.auth:
            security.append("--enable-supernode-auth")
        proc = self.spawn("superlink", [str(BIN / "flower-superlink"), *security,
                                        "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                        "--port", str(self.port)])
        connection = (f'root-certificates = "{self.certs / "ca.crt"}"' if self.tls else "insecure = true")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n{connection}\n')
        wait_for_port(self.port, proc, self.logs / "superlink.log")

    def start_supernode(self, name: str, node_config: str, key: str | None = None) -> subprocess.Popen:
        """Start a SuperNode with ``--node-config node_config`` (and the private key ``key``).

        With ``standby`` (the default) as docs/deployment.md says, with ``fedlora-supernode``: the
        SuperNode in process isolation and ``fedlora-superexec`` next to it; else ``flower-supernode``
        itself (its own SuperExec, a fresh ``flwr-clientapp`` per message).
        """
        security = ["--root-certificates", str(self.certs / "ca.crt")] if self.tls else ["--insecure"]
        if key is not None:
            security += ["--auth-supernode-private-key", str(self.certs / key)]
        command = "fedlora-supernode" if self.standby else "flower-supernode"
        return self.spawn(name, [str(BIN / command), *security, "--superlink", f"127.0.0.1:{self.port}",
                                 "--node-config", node_config, "--host", "127.0.0.1", "--port", str(free_port())])

    def superexec(self, name: str) -> psutil.Process | None:
        """The ``fedlora-superexec`` of node ``name`` (a child of its ``fedlora-supernode``), if one runs."""
        for child in psutil.Process(self.procs[name].pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if any(part.endswith("fedlora-superexec") for part in child.cmdline()):
                    return child
        return None

    def restart_superexec(self, name: str, timeout: float = 60) -> list[int]:
        """Kill all of node ``name`` but its SuperNode: its SuperExec, standby and node worker (SIGKILL).

        ``fedlora-supernode`` starts a new SuperExec; this returns once it runs, with the PIDs
        killed (the SuperExec's first). The SuperNode keeps its node id and its runs' ``Context``.
        """
        old = self.superexec(name)
        assert old is not None, self.log(name)[-3000:]
        victims = [old, *old.children(recursive=True), *self.node_workers(name)]
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        psutil.wait_procs(victims, timeout=30)
        deadline = time.monotonic() + timeout
        while (new := self.superexec(name)) is None or new.pid == old.pid:
            assert time.monotonic() < deadline, f"no new SuperExec:\n{self.log(name)[-3000:]}"
            time.sleep(0.05)
        return [v.pid for v in victims]

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this cluster."""
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, timeout=120,
                              env=self.env, cwd=self.root)

    def deploy_command(self, overrides: list[str], run_dir: Path) -> list[str]:
        """The ``fedlora-deploy`` command line for this cluster's connection."""
        return [str(BIN / "fedlora-deploy"), "--superlink", "test", *overrides, f"hydra.run.dir={run_dir}"]

    def deploy(self, overrides: list[str], run_dir: Path, timeout: float = 900) -> str:
        """Run ``fedlora-deploy`` to the end (killed by PID on a timeout); return its output."""
        proc = self.spawn(f"deploy-{run_dir.name}", self.deploy_command(overrides, run_dir))
        try:
            proc.wait(timeout=timeout)
        finally:
            self.kill(f"deploy-{run_dir.name}")
        out = self.log(f"deploy-{run_dir.name}")
        assert proc.returncode == 0, out[-4000:]
        return out
