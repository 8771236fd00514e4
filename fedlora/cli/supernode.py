"""``fedlora-supernode``: a Flower SuperNode whose ClientApp processes are started ahead of their messages.

    fedlora-supernode [the arguments of flower-supernode]

Runs ``flower-supernode <arguments> --isolation process`` (Flower's mode in which a SuperExec
that the operator starts runs the ClientApps) and, next to it, ``fedlora-superexec``
(fedlora/flower/superexec.py) connected to the SuperNode's Runtime API (``--host``/``--port``,
default 127.0.0.1:9094; over TLS with the CA of ``--ssl-ca-certfile`` when the Runtime API has a
certificate). Both print to this terminal. If the SuperExec exits while the SuperNode runs, a new
one is started: the SuperNode keeps its node id and its runs' state, so the federation does not
notice beyond that message. Ctrl-C or SIGTERM stops both; the exit status is the SuperNode's.

Flower's SuperNode turns SIGINT into a KeyboardInterrupt until it has started, and a
KeyboardInterrupt there prints a traceback and can leave it hanging with its HTTP thread alive
(flwr 1.41). So it starts with SIGINT ignored (Flower's own handler replaces that once it is up,
and a terminal's Ctrl-C then ends it gracefully), and so does the SuperExec (which ends with the
SuperNode); if it still runs ``FORWARD_AFTER`` seconds after
Ctrl-C or SIGTERM reached this command (it was starting, or the signal was sent to this process
alone), it gets SIGTERM, which ends it whether it is up or not. One still running ``KILL_AFTER``
seconds after the signal is killed, with a message saying so. A SuperNode ended by that SIGTERM
makes the exit status 128 + the signal's number (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

BIN = Path(sys.executable).parent
RESTART_PAUSE = 1.0  # seconds between a SuperExec's exit and its replacement
FORWARD_AFTER = 6.0  # seconds after Ctrl-C/SIGTERM before a SuperNode still running gets SIGTERM (> Flower's
# 5 s forced exit, so that a graceful exit under way is not cut short)
KILL_AFTER = 30.0  # seconds after Ctrl-C/SIGTERM before a SuperNode still running is killed


class UsageError(ValueError):
    """Arguments this command cannot run with (the message names the argument and the fix)."""


def superexec_command(args: list[str], supernode_pid: int) -> list[str]:
    """The ``fedlora-superexec`` command line for a SuperNode started with ``args``."""
    parser = argparse.ArgumentParser(add_help=False)
    for option in ("--host", "--port", "--isolation", "--ssl-certfile", "--ssl-ca-certfile",
                   "--superexec-auth-secret-file"):
        parser.add_argument(option)
    parser.add_argument("--allow-runtime-dependency-installation", action="store_true")
    known, _ = parser.parse_known_args(args)
    if known.isolation not in (None, "process"):
        raise UsageError(f"--isolation {known.isolation}: fedlora-supernode runs the SuperNode with --isolation "
                         "process (its ClientApps start from fedlora-superexec); leave --isolation out, or run "
                         "flower-supernode itself")
    if known.ssl_certfile and not known.ssl_ca_certfile:
        raise UsageError(f"--ssl-certfile {known.ssl_certfile}: the SuperExec must verify the Runtime API's "
                         "certificate; add --ssl-ca-certfile with the CA that signed it")
    if known.port is not None and not (known.port.isdigit() and 0 < int(known.port) < 65536):
        raise UsageError(f"--port {known.port}: the SuperNode's Runtime API port must be a number from 1 to 65535; "
                         "e.g. --port 9094 (the default)")
    host = known.host or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):  # noqa: S104 - listening everywhere: the SuperExec is local
        host = "127.0.0.1"
    command = [str(BIN / "fedlora-superexec"), "--runtime-api-address", f"{host}:{known.port or 9094}",
               "--parent-pid", str(supernode_pid)]
    command += ["--root-certificates", known.ssl_ca_certfile] if known.ssl_certfile else ["--insecure"]
    if known.superexec_auth_secret_file:
        command += ["--superexec-auth-secret-file", known.superexec_auth_secret_file]
    if known.allow_runtime_dependency_installation:
        command.append("--allow-runtime-dependency-installation")
    return command


def supernode_command(args: list[str]) -> list[str]:
    """The ``flower-supernode`` command line: ``args`` in process isolation."""
    return [str(BIN / "flower-supernode"), *args, *([] if "--isolation" in args else ["--isolation", "process"])]


def _ignore_sigint() -> None:
    """In a child before it runs Flower: SIGINT ignored until Flower installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    """Start the SuperNode and its SuperExec; keep a SuperExec running until the SuperNode ends."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        superexec_command(args, 0)  # refuse bad arguments before starting anything
    except UsageError as err:
        print(f"fedlora-supernode: {err}", file=sys.stderr)
        return 2
    supernode = subprocess.Popen(supernode_command(args), preexec_fn=_ignore_sigint)  # noqa: S603, PLW1509
    stop_signal: int | None = None
    stopped_at = 0.0
    forwarded = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_signal, stopped_at
        if stop_signal is None:
            stop_signal, stopped_at = signum, time.monotonic()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    superexec: subprocess.Popen[bytes] | None = None
    try:
        while supernode.poll() is None:
            if stop_signal is None and (superexec is None or superexec.poll() is not None):
                if superexec is not None:
                    time.sleep(RESTART_PAUSE)  # a SuperExec that ends with its SuperNode is not restarted
                    if stop_signal is not None or supernode.poll() is not None:
                        continue
                    print(f"fedlora-supernode: the SuperExec exited ({superexec.returncode}); starting a new one",
                          file=sys.stderr, flush=True)
                superexec = subprocess.Popen(superexec_command(args, supernode.pid),  # noqa: S603, PLW1509
                                             preexec_fn=_ignore_sigint)
            time.sleep(0.2)
            waited = time.monotonic() - stopped_at
            if stop_signal is not None and waited >= KILL_AFTER:
                print(f"fedlora-supernode: the SuperNode did not end {KILL_AFTER:.0f} s after "
                      f"{signal.Signals(stop_signal).name}; killing it", file=sys.stderr, flush=True)
                supernode.kill()
                supernode.wait()
            elif stop_signal is not None and waited >= FORWARD_AFTER and not forwarded:
                forwarded = True  # still starting, or the signal was sent to this process alone
                supernode.terminate()
    finally:
        if supernode.poll() is None:  # left the loop by an exception: end the SuperNode, within KILL_AFTER
            supernode.terminate()
            try:
                supernode.wait(timeout=KILL_AFTER)
            except subprocess.TimeoutExpired:
                supernode.kill()
        code = supernode.wait()
        if forwarded and code == -signal.SIGTERM and stop_signal is not None:
            code = 128 + stop_signal  # ended by the SIGTERM standing in for the user's signal
        if superexec is not None and superexec.poll() is None:  # it watches the SuperNode; do not wait long
            try:
                superexec.wait(timeout=5)
            except subprocess.TimeoutExpired:
                superexec.terminate()
                superexec.wait()
    return code


def cli() -> None:
    """Console entry point."""
    sys.exit(main())
