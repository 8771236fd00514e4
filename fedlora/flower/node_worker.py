"""A deployed node's side of a message, without Flower types, and the long-lived node worker process.

:func:`hello` and :func:`train` are what a node computes for the two messages it gets (the hello
query and a training round). They take the message as a :class:`~fedlora.federation.wire.Packet`
and the client's persisted state as a :class:`NodeState` (a plain mirror of ``context.state``),
and return the reply packet; the state is updated in place. The ClientApp
(:mod:`fedlora.flower.client_app`) calls them in its own process (simulation, and the fallback of a
deployment) or has a node worker call them (a deployment, by default), with the same arguments:
what is computed does not depend on where.

The worker (``python -m fedlora.flower.node_worker --socket PATH``) is a process next to a
SuperNode that keeps this process's caches across messages: the run's settings, the workspace
(tokenizer, tokenized data, base model with its adapters: :func:`fedlora.runtime.training.workspace.get_workspace`)
and the compressor. It is a pure cache plus compute: every request brings the client's whole
state (FLoRA's base merges, ComPEFT's residual, the run's label names) and every reply carries it
back to ``context.state``, and the residual is written to the node's state dir as before, so a
worker killed or restarted at any moment changes nothing in what is computed. It answers one
request at a time on a Unix socket (:mod:`fedlora.serving.node_protocol`), and exits when the
SuperNode's SuperExec it was started for is gone or after an idle timeout.

This module imports no flwr (the worker never needs Flower); it lives in ``fedlora.flower`` because
it reads the node config (:mod:`fedlora.flower.node`) and the run config as the apps do.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config.settings import Component, Settings
from fedlora.core import env
from fedlora.core import lora_math as lm
from fedlora.core.faults import InjectedFault
from fedlora.core.types import AdapterState, BaseMerge
from fedlora.federation import keys, wire
from fedlora.federation.client import ClientSide, evaluate_round, train_round
from fedlora.flower.node import NodeSettings, node_rank, node_workspace_key, read_node_config
from fedlora.flower.settings import resolve_settings
from fedlora.results.checkpoint import CLIENT_STATE_DIR, load_client_state, save_client_state
from fedlora.runtime.training.workspace import get_workspace
from fedlora.serving import node_protocol as proto
from fedlora.serving.runtime import WorkspaceTrainer

HISTORY = "fedlora-base-history"  # ArrayRecord in context.state: the base merges applied (FLoRA)
RESIDUAL = "fedlora-ef-residual"  # ArrayRecord in context.state: the compression residual (error feedback)
VIEWS = "fedlora-downlink-views"  # ArrayRecord in context.state: "<round>|<tensor>", the copies of the start
_VIEW = "view|"  # the prefix of a copy's tensors in a client state file (the rest is the residual)
OWN = "fedlora-personal"  # ArrayRecord in context.state: "<round>|<tensor>", the client's own B and head (FedSA-LoRA)
_OWN = "own|"  # the prefix of those tensors in a client state file
OWN_MODEL_DIR = "adapter"  # in its state directory: a personalized client's own model, saved after the last round
LABELS = "fedlora-label-names"  # ConfigRecord in context.state: the run's label names (from the hello)


@dataclass
class NodeState:
    """A client's ``context.state`` as plain values: array records and config records by name."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)


def client_state_dir(settings: Settings, node_config: Mapping[str, Any], cid: int, flwr_home: str | None) -> Path:
    """Where this client keeps the state that must survive a kill.

    In simulation: ``<run dir>/client_state/<client id>``. In a deployment the run directory is
    on the server's machine, so a node writes under its own root: the node-config ``state-dir``,
    else ``$FLWR_HOME/fedlora-state``, then ``<run name>/<client id>``: one directory per run,
    because the files are numbered by round and a later run must not mix with an earlier one.
    """
    if keys.NODE_STATE_DIR in node_config:
        return Path(str(node_config[keys.NODE_STATE_DIR])) / settings.run_dir.name / str(cid)
    if settings.deployment:
        if flwr_home is None:
            raise RuntimeError("a deployed node needs FLWR_HOME to place its state directory")
        return Path(flwr_home) / "fedlora-state" / settings.run_dir.name / str(cid)
    return settings.run_dir / CLIENT_STATE_DIR / str(cid)


class StateStore:
    """A client's :class:`~fedlora.federation.client.ClientStore` in a :class:`NodeState`.

    The residual, the copies of the start (downlink compression) and the client's own ``B`` and head
    (FedSA-LoRA) are also written to ``state_dir`` after every round, in one file, and a client of a
    resumed run that has none in the state loads the newest file at or before the round resumed from.
    """

    def __init__(self, state: NodeState, state_dir: Path) -> None:
        self.state = state
        self.state_dir = state_dir

    def merges(self) -> list[tuple[int, BaseMerge]]:
        """The base merges this client has applied."""
        if HISTORY not in self.state.arrays:
            return []
        return lm.tensors_to_merges(wire.to_tensors(self.state.arrays[HISTORY]))

    def set_merges(self, merges: list[tuple[int, BaseMerge]]) -> None:
        """Replace them."""
        self.state.arrays[HISTORY] = wire.to_arrays(lm.merges_to_tensors(merges))

    def _from_disk(self, resume_round: int,
                   ) -> tuple[AdapterState | None, dict[int, AdapterState], dict[int, AdapterState]]:
        """The residual, the copies and its own ``B`` and head in the newest file up to ``resume_round``
        (a resumed run)."""
        saved = load_client_state(self.state_dir, at_most=resume_round) if resume_round > 0 else None
        residual = {k: v for k, v in (saved or {}).items() if not k.startswith((_VIEW, _OWN))}
        views = _split_rounds({k[len(_VIEW):]: v for k, v in (saved or {}).items() if k.startswith(_VIEW)})
        own = _split_rounds({k[len(_OWN):]: v for k, v in (saved or {}).items() if k.startswith(_OWN)})
        return residual or None, views, own

    def residual(self, resume_round: int) -> AdapterState | None:
        """The residual in the state, else (a resumed run) the newest file's up to ``resume_round``."""
        if RESIDUAL in self.state.arrays:
            return wire.to_tensors(self.state.arrays[RESIDUAL])
        return self._from_disk(resume_round)[0]

    def views(self, resume_round: int) -> dict[int, AdapterState]:
        """The copies of the start in the state, else (a resumed run) the newest file's up to ``resume_round``."""
        if VIEWS in self.state.arrays:
            return _split_rounds(wire.to_tensors(self.state.arrays[VIEWS]))
        return self._from_disk(resume_round)[1]

    def personal(self, resume_round: int) -> dict[int, AdapterState]:
        """Its own ``B`` and head in the state, else (a resumed run) the newest file's up to ``resume_round``."""
        if OWN in self.state.arrays:
            return _split_rounds(wire.to_tensors(self.state.arrays[OWN]))
        return self._from_disk(resume_round)[2]

    def save_personal(self, server_round: int, own: dict[int, AdapterState]) -> None:
        """Keep them in the state and on disk."""
        self.state.arrays[OWN] = _join_rounds(own)
        self._write(server_round)

    def model_dir(self) -> Path:
        """``adapter/`` in its state directory: its own model, saved in a personalized strategy's last round."""
        return self.state_dir / OWN_MODEL_DIR

    def save_residual(self, server_round: int, residual: AdapterState) -> None:
        """Keep it in the state and on disk."""
        self.state.arrays[RESIDUAL] = wire.to_arrays(residual)
        self._write(server_round)

    def save_views(self, server_round: int, views: dict[int, AdapterState]) -> None:
        """Keep them in the state and on disk."""
        self.state.arrays[VIEWS] = _join_rounds(views)
        self._write(server_round)

    def _write(self, server_round: int) -> None:
        """The client's state file of ``server_round``: the residual, the copies and its own ``B`` and head it
        holds now."""
        tensors = wire.to_tensors(self.state.arrays.get(RESIDUAL, {}))
        tensors.update({_VIEW + k: v for k, v in wire.to_tensors(self.state.arrays.get(VIEWS, {})).items()})
        tensors.update({_OWN + k: v for k, v in wire.to_tensors(self.state.arrays.get(OWN, {})).items()})
        save_client_state(self.state_dir, server_round, tensors)


def _join_rounds(by_round: Mapping[int, AdapterState]) -> dict[str, np.ndarray]:
    """``{round: {tensor: t}}`` as arrays named ``"<round>|<tensor>"`` (the copies, its own B and head)."""
    return wire.to_arrays({f"{r}|{k}": v for r, state in by_round.items() for k, v in state.items()})


def _split_rounds(flat: Mapping[str, Any]) -> dict[int, AdapterState]:
    """``{"<round>|<tensor>": t}`` as ``{round: {tensor: t}}``."""
    views: dict[int, AdapterState] = {}
    for key, value in flat.items():
        view_round, _, name = key.partition("|")
        views.setdefault(int(view_round), {})[name] = value
    return views


@functools.lru_cache(maxsize=4)
def _compressor(component: Component | None) -> Any:
    """The run's compressor, built once per process."""
    return component.build() if component is not None else None


def label_names(state: NodeState) -> tuple[str, ...] | None:
    """The run's label names the hello left in the state (``None`` before the hello)."""
    if LABELS not in state.configs:
        return None
    return tuple(str(n) for n in state.configs[LABELS][keys.LABEL_NAMES])


@functools.lru_cache(maxsize=8)
def _node(settings: Settings, node_config: tuple[tuple[str, Any], ...]) -> NodeSettings:
    """This node's checked settings (its data file is checked once per process, not per message)."""
    return read_node_config(settings, dict(node_config))


@functools.lru_cache(maxsize=8)
def client_side(settings: Settings, node: NodeSettings, labels: tuple[str, ...] | None) -> ClientSide:
    """What this node trains with, built once per process (the workspace itself is cached by its key)."""
    trainer = WorkspaceTrainer(node_workspace_key(settings, node, labels), settings.train, settings.seed,
                               reload_per_call=settings.simulation.reload_model_per_call,
                               eval_batch_size=settings.eval_batch_size)
    return ClientSide(trainer=trainer, compressor=_compressor(settings.compression), faults=settings.faults,
                      seed=settings.seed, downlink=_compressor(settings.downlink))


# the run whose base merges the host of each workspace holds (a long-lived worker serves run after run)
_BASE_OWNER: dict[int, str] = {}


def hello(packet: wire.Packet, settings: Settings, node_config: Mapping[str, Any], state: NodeState) -> wire.Packet:
    """Check this node's config and data; tell the server its partition id, rank and examples.

    The hello carries the run's label names (the server's dataset numbers the classes); they
    are kept in the state for the training messages, and a node whose data names its classes
    differently fails here, before any round.
    """
    node = read_node_config(settings, node_config)
    names = wire.decode_hello(packet)
    if names is not None:
        state.configs[LABELS] = {keys.LABEL_NAMES: list(names)}
    ws = get_workspace(node_workspace_key(settings, node, names))
    if names is not None and tuple(ws.label_names) != names:
        raise RuntimeError(f"this node's dataset has the labels {list(ws.label_names)} but the server's has "
                           f"{list(names)}; give every node and the server the same data config")
    return wire.encode_hello_reply(node.client_id, node_rank(settings, node), len(ws.partition(node.client_id)))


def train(packet: wire.Packet, settings: Settings, node_config: Mapping[str, Any], state: NodeState, *,
          run: str, flwr_home: str | None, evaluate: bool = False) -> wire.Packet:
    """Train this client's adapter from the server's assignment (or, with ``evaluate``, evaluate the
    model the message carries on the client's held-out examples); the (encoded) reply.

    ``run`` names the run (its base merges are this run's: a host that last held another run's
    is reset to the pristine base first).
    """
    node = _node(settings, tuple(sorted(node_config.items())))
    side = client_side(settings, node, label_names(state))
    trainer = side.trainer
    if isinstance(trainer, WorkspaceTrainer):
        host = trainer.ws.host
        if _BASE_OWNER.get(id(host)) != run:
            host.set_base(("pristine", run), None)  # W0, and a version no merge count equals
            _BASE_OWNER[id(host)] = run
    store = StateStore(state, client_state_dir(settings, node_config, node.client_id, flwr_home))
    if evaluate:
        return evaluate_round(packet, node.client_id, side, store)
    return train_round(packet, node.client_id, side, store)


# -- requests (the worker, and the ClientApp's fallback) -------------------------------------------
def _packet(header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> wire.Packet:
    content = header["content"]
    return wire.Packet(arrays=proto.unpack_records("msg", arrays, content["records"]),
                       config=dict(content["config"]), metrics=dict(content["metrics"]))


def reply_frame(packet: wire.Packet, state: NodeState) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A computed reply and the updated state as a frame."""
    header = {"ok": True,
              "content": {"records": list(packet.arrays), "config": packet.config, "metrics": packet.metrics},
              "state": {"records": list(state.arrays), "configs": state.configs}}
    return header, {**proto.pack_records("msg", packet.arrays), **proto.pack_records("state", state.arrays)}


def handle(header: dict[str, Any], arrays: dict[str, np.ndarray],
           settings: Settings | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Answer one request frame (see :func:`fedlora.flower.client_app.request_frame`).

    The computation's own errors come back as ``ok: false`` with the exception's class and
    message, which the ClientApp raises again (so that Flower reports the same error).
    """
    try:
        if settings is None:
            raw = header["config"]
            env.apply(offline=bool(json.loads(raw).get("offline", True)))
            settings = resolve_settings(None, {keys.CLIENT_CONFIG: raw})
        state = NodeState(proto.unpack_records("state", arrays, header["state"]["records"]),
                          {k: dict(v) for k, v in header["state"]["configs"].items()})
        packet = _packet(header, arrays)
        node_config = dict(header["node_config"])
        if header["kind"] == "hello":
            reply = hello(packet, settings, node_config, state)
        else:
            reply = train(packet, settings, node_config, state, run=str(header["run"]),
                          flwr_home=header.get("flwr_home"), evaluate=header["kind"] == "evaluate")
        return reply_frame(reply, state)
    except Exception as exc:  # noqa: BLE001 - every error goes back to the ClientApp, which raises it
        cls = type(exc)
        # an injected fault is the test's intent, not a bug: its message says all (no traceback on the console)
        trace = "" if isinstance(exc, InjectedFault) else traceback.format_exc()
        return {"ok": False, "error_module": cls.__module__, "error_class": cls.__qualname__,
                "error": str(exc), "traceback": trace}, {}


# -- the worker process ----------------------------------------------------------------------------
def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m fedlora.flower.node_worker --socket PATH [--watch-pid PID] [--idle-timeout S]``."""
    parser = argparse.ArgumentParser(prog="fedlora-node-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument("--watch-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--idle-timeout", type=float, default=900.0, help="exit after this many seconds idle")
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [pid {os.getpid()}] {text}", flush=True)

    def answer(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        log(f"{header.get('kind')} (run {header.get('run')}): started")
        out = handle(header, arrays)
        out[0]["seconds"] = time.perf_counter() - t0  # the forwarder logs it next to its own time
        status = "ok" if out[0]["ok"] else f"error {out[0]['error_class']}: {out[0]['error']}"
        log(f"{header.get('kind')} (run {header.get('run')}): {status} in {time.perf_counter() - t0:.2f} s")
        return out

    log(f"fedlora node worker listening at {args.socket} (python {sys.executable})")
    why = proto.serve(Path(args.socket), answer, idle_timeout=args.idle_timeout,
                      alive=lambda: _alive(args.watch_pid), log=log)
    log(f"fedlora node worker exits: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
