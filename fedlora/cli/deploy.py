"""The ``fedlora-deploy`` command: run an experiment on Flower's Deployment Engine.

    fedlora-deploy --superlink NAME [--app DIR] [--no-node-worker] [--dry-run] [the same Hydra overrides as fedlora]

It composes and validates the config exactly like ``fedlora`` (exit status 2 and every problem
named before anything is contacted), creates the run directory, writes the resolved config
there (``config.yaml``) and as ``run_config.toml``, then runs::

    flwr run <app dir> <NAME> --run-config <run dir>/run_config.toml --stream

and waits for the run to end (the log streams through; a copy goes to ``<run dir>/flwr-run.log``).

Decisions (flwr 1.42):

- *How the config travels.* Flower's run config holds flat scalars only, and ``flwr run
  --run-config`` accepts ``k=v`` pairs or one TOML file whose keys must exist in
  ``[tool.flwr.app.config]``. The resolved Hydra config (nested, with lists) goes as one JSON
  string under the key ``fedlora-config`` in a TOML file written to the run directory, so the
  exact config of every deployed run stays on disk next to its results; the apps decode it
  (:func:`fedlora.flower.settings.resolve_config`).
- *How the SuperLink is named.* ``flwr run`` takes the name of a connection defined in
  ``$FLWR_HOME/config.toml`` (``[superlink.NAME]`` with ``address``, and ``root-certificates``
  for TLS or ``insecure = true``); it has no flag for an address or a certificate. We check that
  connection (and that its certificate file exists) before starting anything, and pass its name.
- *Where outputs land.* The ServerApp runs on the SuperLink's machine (a ``flwr-serverapp``
  process of the SuperLink) and writes to ``output_dir``, the absolute path of the run
  directory created here; run ``fedlora-deploy`` on the SuperLink's machine.
- *A node worker on every node, by default.* Flower 1.42 starts a fresh ``flwr-clientapp``
  process per message (none of its warm executors serves ClientApps), so the ClientApp forwards
  each message to a long-lived fedlora node worker next to the SuperNode, which keeps the base
  model and the tokenized data (:mod:`fedlora.flower.client_app`, docs/deployment.md). The
  deployment record says so (``node_worker``); ``--no-node-worker`` turns it off for the run.
  The nodes themselves are started with ``fedlora-supernode`` (:mod:`fedlora.cli.supernode`):
  Flower's SuperNode in process isolation with ``fedlora-superexec``, whose ``flwr-clientapp``
  processes have imported Flower before their message comes.
- *No runtime dependency installation.* ``[project].dependencies`` is empty (pyproject.toml) and
  the guide starts the SuperLink with ``--disable-runtime-dependency-installation``: every
  machine runs the apps in its own prepared environment.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from fedlora.core import env

env.apply(offline="offline=false" not in sys.argv)

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedlora.cli.main import prepare  # noqa: E402
from fedlora.cli.rundir import mark_failed  # noqa: E402
from fedlora.config import CONF_DIR  # noqa: E402
from fedlora.core.errors import ConfigError  # noqa: E402
from fedlora.federation import keys  # noqa: E402

APP_DIR = Path(__file__).resolve().parent.parent.parent
RUN_CONFIG = "run_config.toml"
FLWR_LOG = "flwr-run.log"
INTERRUPTED = 130  # the exit status of a command stopped with Ctrl-C


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` into our options and the Hydra overrides (everything else, in order)."""
    parser = argparse.ArgumentParser(
        prog="fedlora-deploy",
        description="Run a fedlora experiment on a Flower SuperLink (docs/deployment.md).",
        epilog="Every other argument is a Hydra override, as for `fedlora` (`fedlora --help` lists the config "
               "groups; `fedlora-deploy --cfg job ...` prints the composed config).")
    parser.add_argument("--superlink", default=None,
                        help="name of a SuperLink connection in $FLWR_HOME/config.toml (default: its default)")
    parser.add_argument("--app", default=str(APP_DIR), help="the Flower app directory (default: this checkout)")
    parser.add_argument("--no-node-worker", dest="node_worker", action="store_false",
                        help="answer every message in a fresh flwr-clientapp process on the nodes (no long-lived "
                             "node worker keeping the model and data; slower, see docs/deployment.md)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, write the run directory and print the flwr command without running it")
    return parser.parse_known_args(argv)


def flwr_home() -> Path:
    """``$FLWR_HOME``, else ``~/.flwr`` (where ``flwr`` keeps config.toml)."""
    from flwr.supercore.utils import get_flwr_home  # noqa: PLC0415

    return Path(get_flwr_home())


def read_connection(name: str | None, problems: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Find SuperLink connection ``name`` (``None``: the default) in ``$FLWR_HOME/config.toml``.

    Returns ``(name, table)``; appends to ``problems`` what is missing or wrong.
    """
    path = flwr_home() / "config.toml"
    if not path.is_file():
        problems.append(f"--superlink={name!r}: {path} does not exist; create it with a [superlink.<name>] table "
                        "(address, and root-certificates for TLS), see docs/deployment.md, or set FLWR_HOME")
        return name, {}
    superlink = tomllib.loads(path.read_text()).get("superlink", {})
    name = name if name is not None else superlink.get("default")
    known = sorted(k for k, v in superlink.items() if isinstance(v, dict))
    if name is None:
        problems.append(f"--superlink=None: {path} sets no [superlink] default; pass --superlink with one "
                        f"of {known}")
        return name, {}
    table = superlink.get(name)
    if not isinstance(table, dict):
        problems.append(f"--superlink={name!r}: {path} has no [superlink.{name}] table; known connections: "
                        f"{known}")
        return name, {}
    address = table.get("address")
    if not address or str(address).startswith(":"):
        problems.append(f"[superlink.{name}] address={address!r}: give the SuperLink's host:port (the local "
                        "simulation connection is for `flwr run` simulations; simulate with `fedlora`)")
    cert = table.get("root-certificates")
    if cert is not None and not Path(str(cert)).expanduser().is_file():
        problems.append(f"[superlink.{name}] root-certificates={cert!r}: no such file; point it at the CA "
                        "certificate that signed the SuperLink's certificate (fedlora-certs writes ca.crt)")
    return name, table


def _check_app(app: Path, problems: list[str]) -> None:
    pyproject = app / "pyproject.toml"
    if not pyproject.is_file():
        problems.append(f"--app={str(app)!r}: no pyproject.toml there; give the fedlora checkout directory")
        return
    flwr_app = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
    if keys.CLIENT_CONFIG not in flwr_app.get("config", {}) or not flwr_app.get("components"):
        problems.append(f"--app={str(app)!r}: its pyproject.toml lacks [tool.flwr.app.components] or the "
                        f"run-config key {keys.CLIENT_CONFIG!r}; give the fedlora checkout directory")


def check_deployment(container: dict[str, Any], opts: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Check what only a deployment needs: return the ``deployment`` record and the problems."""
    problems: list[str] = []
    if (container.get("transport") or "flower") != "flower":
        problems.append(f"transport={container.get('transport')!r}: the centralized upper bound "
                        "(strategy=centralized) pools every client's data in one process, it has no federation to "
                        "deploy; run it with `fedlora strategy=centralized`")
    if container.get("resume"):
        problems.append(f"resume={container['resume']!r}: resuming a deployed run is not supported; start a new "
                        "run (`fedlora resume=...` resumes simulations)")
    name, table = read_connection(opts.superlink, problems)
    app = Path(opts.app).expanduser().resolve()
    _check_app(app, problems)
    record = {"superlink": name, "address": table.get("address"), "tls": "root-certificates" in table,
              "app": str(app), "node_worker": bool(getattr(opts, "node_worker", True))}
    return record, problems


def prepare_deployment(cfg: DictConfig, run_dir: Path, opts: argparse.Namespace) -> dict[str, Any]:
    """The resolved, validated config with its ``deployment`` record.

    Raises one :class:`ConfigError` with the config's and the deployment's problems together.
    """
    problems: list[str] = []
    try:
        container = prepare(cfg, run_dir)
    except ConfigError as exc:
        problems += exc.problems
        container = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    container["deployment"], more = check_deployment(container, opts)
    if problems + more:
        raise ConfigError(problems + more)
    return container


def write_run_config(run_dir: Path, container: dict[str, Any]) -> Path:
    """Write ``run_config.toml``: the resolved config as one JSON string (see the module docstring)."""
    import tomli_w  # noqa: PLC0415 - ships with flwr

    path = run_dir / RUN_CONFIG
    path.write_text(tomli_w.dumps({keys.CLIENT_CONFIG: json.dumps(container, sort_keys=True)}))
    return path


def flwr_command(app: str, superlink: str, run_config: Path) -> list[str]:
    """The ``flwr run`` command line (the ``flwr`` next to this Python, else on PATH)."""
    local = Path(sys.executable).parent / "flwr"
    exe = str(local) if local.exists() else "flwr"
    return [exe, "run", app, superlink, "--run-config", str(run_config), "--stream"]


def launch(command: list[str], run_dir: Path) -> int:
    """Run ``command``, copying its output to the console and to ``<run dir>/flwr-run.log``."""
    with (run_dir / FLWR_LOG).open("w") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
        except KeyboardInterrupt:
            proc.terminate()
            print("fedlora-deploy: stopped following the run; it goes on on the SuperLink "
                  "(`flwr ls` lists runs, `flwr stop <run-id>` stops one)", file=sys.stderr)
            return INTERRUPTED
        return proc.wait()


def deploy_job(cfg: DictConfig, opts: argparse.Namespace) -> None:
    """Validate, write the run directory, run ``flwr run`` and check that the run finished."""
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        container = prepare_deployment(cfg, run_dir, opts)
    except ConfigError as exc:
        print(f"fedlora-deploy: {exc}", file=sys.stderr)
        mark_failed(run_dir, str(exc))
        sys.exit(2)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(container))
    run_config = write_run_config(run_dir, container)
    command = flwr_command(container["deployment"]["app"], container["deployment"]["superlink"], run_config)
    print(f"fedlora-deploy: run directory {run_dir}\nfedlora-deploy: {' '.join(command)}", flush=True)
    if opts.dry_run:
        return
    for stale in ("summary.json", "FAILED"):  # left by an earlier run in this directory: not this run's verdict
        (run_dir / stale).unlink(missing_ok=True)
    finish(launch(command, run_dir), run_dir)


def finish(code: int, run_dir: Path) -> None:
    """Exit with the run's verdict: 0 only if the ServerApp wrote ``summary.json``.

    Ctrl-C (``code`` 130) stops following the run, not the run: it goes on on the SuperLink and
    may still write ``summary.json`` here, so it must not be marked FAILED (fedlora-report would
    then list a finished run as failed).
    """
    if code == INTERRUPTED:
        sys.exit(code)
    if code != 0:
        mark_failed(run_dir, f"`flwr run` exited with status {code}; see {run_dir / FLWR_LOG}")
        sys.exit(code)
    if not (run_dir / "summary.json").is_file():
        failed = run_dir / "FAILED"
        where = (f"the ServerApp's error is above and in {failed}" if failed.is_file()
                 else f"no summary.json and no FAILED in {run_dir}: the run was stopped (`flwr stop`), its "
                      "ServerApp was killed, or fedlora-deploy runs on another machine than the SuperLink "
                      "(the ServerApp writes there); `flwr ls` shows the run's status")
        print(f"fedlora-deploy: the run did not finish; {where}", file=sys.stderr)
        sys.exit(1)


def cli() -> None:
    """The console script ``fedlora-deploy``."""
    opts, rest = parse_arguments(sys.argv[1:])
    sys.argv[1:] = rest

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
    def job(cfg: DictConfig) -> None:
        deploy_job(cfg, opts)

    job()


if __name__ == "__main__":
    cli()
