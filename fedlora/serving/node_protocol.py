"""The link between a deployed node's ClientApp and its long-lived worker: framing, address, start.

Flower 1.42 runs every message of a deployed node in a new ``flwr-clientapp`` process
(docs/deployment.md), so the base model, the tokenizer and the tokenized data would be rebuilt for
every message. A node worker (:mod:`fedlora.flower.node_worker`) is a process next to the SuperNode
that keeps them; the ClientApp forwards each message to it over a Unix socket and writes the state
the worker returns back into ``context.state``. This module is what both ends share, and what the
ClientApp imports on its fast path: the standard library and numpy only (no torch, no
transformers, no flwr), so a forwarding ``flwr-clientapp`` stays light.

A frame is: 8 bytes big-endian length of a UTF-8 JSON header, the header, then the raw bytes of
the arrays the header lists under ``"arrays"`` (``[name, dtype, shape]`` each, in order; C order,
little- or big-endian as the dtype string says). Requests and replies are one frame each, one
request per connection. Nothing is pickled: a peer can send numbers and strings, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

PROTOCOL = 1
_LEN = struct.Struct(">Q")
MAX_HEADER = 64 << 20  # a header holds configs and array descriptions, never array data


class WorkerUnavailable(ConnectionError):
    """No worker answered on the socket (none started, it died, or it went away mid-request)."""


class EmptyConnection(WorkerUnavailable):
    """The peer closed the connection before sending anything (a probe: is anyone listening?)."""


class WorkerError(RuntimeError):
    """The worker answered with an error that is not the computation's own (protocol, version)."""


# -- framing ------------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WorkerUnavailable(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def send_frame(sock: socket.socket, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Send ``header`` (JSON-able) and ``arrays`` as one frame."""
    contiguous = {name: np.asarray(a, order="C") for name, a in arrays.items()}  # (0-d stays 0-d)
    head = dict(header)
    head["arrays"] = [[name, a.dtype.str, list(a.shape)] for name, a in contiguous.items()]
    raw = json.dumps(head).encode()
    sock.sendall(_LEN.pack(len(raw)) + raw)
    for a in contiguous.values():
        if a.nbytes:
            sock.sendall(a.reshape(-1).view(np.uint8).tobytes() if a.nbytes < (1 << 20) else a.data.cast("B"))


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Receive one frame: the header (without ``"arrays"``) and the arrays by name, in order."""
    first = sock.recv(_LEN.size)
    if not first:
        raise EmptyConnection("connection closed before a frame")
    (size,) = _LEN.unpack(first + _recv_exact(sock, _LEN.size - len(first)))
    if size > MAX_HEADER:
        raise WorkerError(f"frame header of {size} bytes; not a fedlora node-worker peer")
    header = json.loads(_recv_exact(sock, size))
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape in header.pop("arrays", []):
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise WorkerError(f"array {name!r} has dtype {dtype}; only plain numeric arrays travel")
        count = int(np.prod(shape, dtype=np.int64))
        data = _recv_exact(sock, count * dt.itemsize) if count else b""
        arrays[name] = np.frombuffer(data, dtype=dt, count=count).reshape(tuple(shape)).copy()
    return header, arrays


# -- records <-> frame ----------------------------------------------------------------------------
def pack_records(prefix: str, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Flatten named array records into frame arrays ``<prefix>/<record>/<key>`` (order kept)."""
    return {f"{prefix}/{record}/{key}": value for record, values in arrays.items() for key, value in values.items()}


def unpack_records(prefix: str, flat: Mapping[str, np.ndarray], order: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """The inverse of :func:`pack_records` for ``prefix``; ``order`` lists the record names (empty ones too)."""
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in order}
    start = prefix + "/"
    for name, value in flat.items():
        if name.startswith(start):
            record, key = name[len(start):].split("/", 1)
            out.setdefault(record, {})[key] = value
    return out


# -- where a node's worker listens --------------------------------------------------------------
def socket_path(flwr_home: str, node_id: int, app_dir: str) -> Path:
    """The Unix socket of the worker of SuperNode ``node_id`` running the app code in ``app_dir``.

    Derived from ``FLWR_HOME``, the node id and the app's code directory (a new run with other
    code gets its own worker), hashed into a short name in a per-user directory of the temporary
    directory: a Unix socket path must stay under about 100 bytes, and ``FLWR_HOME`` may be long.
    """
    digest = hashlib.sha256(f"{Path(flwr_home).resolve()}\0{node_id}\0{Path(app_dir).resolve()}".encode())
    root = Path(tempfile.gettempdir()) / f"fedlora-{os.getuid()}"
    return root / f"w-{digest.hexdigest()[:20]}.sock"


def private_dir(directory: Path) -> None:
    """Create ``directory`` (mode 0700) or check that it is ours and private, else :class:`WorkerUnavailable`.

    The sockets live in the shared temporary directory: a directory someone else created or can
    write to could hold a socket that is not our worker's.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise WorkerUnavailable(f"{directory} is not a private directory of this user (owner {info.st_uid}, "
                                f"mode {stat.S_IMODE(info.st_mode):o}); remove it")


def call(path: Path, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *,
         connect_timeout: float = 5.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Send one request to the worker at ``path`` and wait for its reply (however long it trains).

    Raises :class:`WorkerUnavailable` when nothing answers there or the worker goes away before
    replying (the caller may then compute in-process: the worker keeps no state of its own).
    """
    private_dir(path.parent)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(connect_timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:  # no file, nobody listening, refused
            raise WorkerUnavailable(f"no node worker at {path} ({exc.__class__.__name__})") from exc
        sock.settimeout(None)
        try:
            send_frame(sock, {"protocol": PROTOCOL, **header}, arrays)
            reply, out = recv_frame(sock)
        except OSError as exc:
            raise WorkerUnavailable(f"the node worker at {path} went away ({exc})") from exc
    finally:
        sock.close()
    return reply, out


def wait_until_listening(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """Wait until something accepts connections at ``path`` (``False`` on a timeout or if ``proc`` exits).

    With ``proc``: until *that* process listens there (its PID in ``<path>.pid``, written after it
    bound the socket), so that a worker that was just killed and whose listening socket the kernel
    has not closed yet is never mistaken for the new one.
    """
    deadline = time.monotonic() + timeout
    pid_file = Path(f"{path}.pid")
    while True:
        mine = proc is None or (pid_file.is_file() and pid_file.read_text().strip() == str(proc.pid))
        if mine:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    sock.connect(str(path))
                    return True
                except OSError:
                    pass
        if time.monotonic() >= deadline or (proc is not None and proc.poll() is not None):
            return False
        time.sleep(0.05)


def _pid_alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def start_worker(path: Path, app_dir: str, *, watch_pid: int | None, idle_timeout: float) -> subprocess.Popen[bytes]:
    """Start a node worker listening at ``path``, detached (its own session), running the code in ``app_dir``.

    ``app_dir`` goes first on its ``PYTHONPATH``: the worker computes with the very code the run
    shipped (``flwr-clientapp`` imports it from the installed FAB), not with whatever fedlora is
    installed. Its output goes to ``<path>.log``. It exits when ``watch_pid`` (the SuperNode's
    SuperExec) is gone, or after ``idle_timeout`` seconds without a request.
    """
    private_dir(path.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([app_dir, *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "fedlora.flower.node_worker", "--socket", str(path),
               "--idle-timeout", str(idle_timeout)]
    if watch_pid is not None:
        command += ["--watch-pid", str(watch_pid)]
    with open(f"{path}.log", "ab") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=app_dir, start_new_session=True)


# -- the worker's side ----------------------------------------------------------------------------
Handler = Callable[[dict[str, Any], dict[str, np.ndarray]], tuple[dict[str, Any], dict[str, np.ndarray]]]


def serve(path: Path, handler: Handler, *, idle_timeout: float, alive: Callable[[], bool] = lambda: True,
          log: Callable[[str], None] = print) -> str:
    """Answer requests at ``path`` one at a time until idle for ``idle_timeout`` s or ``alive()`` is false.

    The socket file is created with mode 0600 in a 0700 directory (only this user can talk to the
    worker); a stale socket file of a dead worker is replaced, a live worker's is left alone (then
    this one exits at once). Returns why it stopped.
    """
    private_dir(path.parent)
    pid_file = Path(f"{path}.pid")
    if wait_until_listening(path, None, 0) and _pid_alive(pid_file):
        return f"another worker already listens at {path}"
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old_umask)
    server.listen(16)
    server.settimeout(1.0)
    pid_file.write_text(str(os.getpid()))
    last = time.monotonic()
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                if not alive():
                    return "the SuperNode it serves is gone"
                if time.monotonic() - last > idle_timeout:
                    return f"idle for {idle_timeout:g} s"
                continue
            with conn:
                conn.settimeout(None)
                try:
                    header, arrays = recv_frame(conn)
                    if header.get("protocol") != PROTOCOL:
                        reply: tuple[dict[str, Any], dict[str, np.ndarray]] = (
                            {"ok": False, "worker_error": f"protocol {header.get('protocol')!r}, this worker speaks "
                                                          f"{PROTOCOL}"}, {})
                    else:
                        reply = handler(header, arrays)
                    send_frame(conn, *reply)
                except EmptyConnection:
                    pass  # wait_until_listening's probe
                except Exception as exc:  # noqa: BLE001 - a bad request must not end the worker
                    log(f"fedlora node worker: dropped a request: {exc!r}")
            last = time.monotonic()
    finally:
        server.close()
        if pid_file.is_file() and pid_file.read_text() == str(os.getpid()):
            path.unlink(missing_ok=True)
            pid_file.unlink(missing_ok=True)
