"""The ClientApp: one handler for the hello query and one for training.

The training itself is the Flower-free client side of a round
(:func:`fedlora.federation.client.train_round`); this module only turns messages into packets and
back, and keeps in ``context.state`` what must survive between rounds when client processes are
short-lived: the base merges it has applied (FLoRA) and its compression residual (error feedback).
The frozen base model and the tokenized data live in a per-process cache
(:func:`fedlora.runtime.training.workspace.get_workspace`); the compressor is built once per process.

In a deployment every message is handled by a new ``flwr-clientapp`` process (Flower 1.41, in
both isolation modes), so nothing in the per-process cache survives between rounds; what
survives is ``context.state``: the SuperNode keeps each run's context in its memory and every
``flwr-clientapp`` process pushes the updated context back when it ends (read in
``flwr/supernode/runtime/run_clientapp.py`` and ``servicer/runtime/runtime_handlers.py``;
``tests/integration/test_deploy.py`` checks that a deployed run equals the simulated one). The
hello also leaves the run's label names there, for a node that trains on its own file.

Surviving a kill: ``context.state`` dies with the run (or the SuperNode). The base merges need
nothing more (a resumed server resends them all from its checkpoint). The residual is also
written after every round to ``<state dir>/round_<t>.safetensors`` (see
:func:`client_state_dir`), and a client of a resumed run that has no residual in
``context.state`` loads the newest file at or before the round the server resumed from.

Fault injection (``faults`` config group, :mod:`fedlora.core.faults`) happens in the client side of
a round: an injected failure raises, which Flower turns into an error reply.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedlora.config.settings import Component, Settings
from fedlora.core import lora_math as lm
from fedlora.core.types import AdapterState, BaseMerge
from fedlora.federation import keys, wire
from fedlora.federation.client import ClientSide, train_round
from fedlora.flower import records
from fedlora.flower.actors import prepare_actor
from fedlora.flower.node import NodeSettings, node_rank, node_workspace_key, read_node_config
from fedlora.flower.settings import resolve_settings
from fedlora.results.checkpoint import CLIENT_STATE_DIR, load_client_state, save_client_state
from fedlora.runtime.training.workspace import get_workspace
from fedlora.serving.runtime import WorkspaceTrainer

_HISTORY = "fedlora-base-history"
_RESIDUAL = "fedlora-ef-residual"
_LABELS = "fedlora-label-names"


def client_state_dir(settings: Settings, context: Context, cid: int) -> Path:
    """Where this client keeps the state that must survive a kill (see the module docstring).

    In simulation: ``<run dir>/client_state/<client id>``. In a deployment the run directory is
    on the server's machine, so a node writes under its own root: the node-config ``state-dir``,
    else ``$FLWR_HOME/fedlora-state``, then ``<run name>/<client id>``: one directory per run,
    because the files are numbered by round and a later run must not mix with an earlier one.
    """
    if keys.NODE_STATE_DIR in context.node_config:
        return Path(str(context.node_config[keys.NODE_STATE_DIR])) / settings.run_dir.name / str(cid)
    if settings.deployment:
        from flwr.supercore.utils import get_flwr_home  # noqa: PLC0415

        return get_flwr_home() / "fedlora-state" / settings.run_dir.name / str(cid)
    return settings.run_dir / CLIENT_STATE_DIR / str(cid)


class ContextStore:
    """A client's :class:`~fedlora.federation.client.ClientStore` in its Flower ``context.state``.

    The residual is also written to ``state_dir`` after every round, and a client of a resumed run
    that has none in ``context.state`` loads the newest file at or before the round resumed from.
    """

    def __init__(self, context: Context, state_dir: Path) -> None:
        self.state = context.state
        self.state_dir = state_dir

    def merges(self) -> list[tuple[int, BaseMerge]]:
        """The base merges this client has applied."""
        if _HISTORY not in self.state:
            return []
        return lm.tensors_to_merges(wire.to_tensors(records.record_to_arrays(self.state[_HISTORY])))

    def set_merges(self, merges: list[tuple[int, BaseMerge]]) -> None:
        """Replace them."""
        self.state[_HISTORY] = records.arrays_to_record(wire.to_arrays(lm.merges_to_tensors(merges)))

    def residual(self, resume_round: int) -> AdapterState | None:
        """The residual in ``context.state``, else (a resumed run) the newest file up to ``resume_round``."""
        if _RESIDUAL in self.state:
            return wire.to_tensors(records.record_to_arrays(self.state[_RESIDUAL]))
        if resume_round > 0:
            return load_client_state(self.state_dir, at_most=resume_round)
        return None

    def save_residual(self, server_round: int, residual: AdapterState) -> None:
        """Keep it in ``context.state`` and on disk."""
        self.state[_RESIDUAL] = records.arrays_to_record(wire.to_arrays(residual))
        save_client_state(self.state_dir, server_round, residual)


@functools.lru_cache(maxsize=4)
def _compressor(component: Component | None) -> Any:
    """The run's compressor, built once per process."""
    return component.build() if component is not None else None


def _label_names(context: Context) -> tuple[str, ...] | None:
    """The run's label names the hello left in ``context.state`` (``None`` before the hello)."""
    if _LABELS not in context.state:
        return None
    return tuple(str(n) for n in context.state[_LABELS][keys.LABEL_NAMES])  # type: ignore[union-attr]


def handle_hello(msg: Message, context: Context, settings: Settings) -> Message:
    """Check this node's config and data; tell the server its partition id, rank and examples.

    The hello carries the run's label names (the server's dataset numbers the classes); they
    are kept in ``context.state`` for the training messages, and a node whose data names its
    classes differently fails here, before any round.
    """
    node = read_node_config(settings, context.node_config)
    names = wire.decode_hello(records.to_packet(msg.content))
    if names is not None:
        context.state[_LABELS] = ConfigRecord({keys.LABEL_NAMES: list(names)})
    ws = get_workspace(node_workspace_key(settings, node, names))
    if names is not None and tuple(ws.label_names) != names:
        raise RuntimeError(f"this node's dataset has the labels {list(ws.label_names)} but the server's has "
                           f"{list(names)}; give every node and the server the same data config")
    reply = wire.encode_hello_reply(node.client_id, node_rank(settings, node), len(ws.partition(node.client_id)))
    return Message(records.to_content(reply), reply_to=msg)


@functools.lru_cache(maxsize=8)
def _node(settings: Settings, node_config: tuple[tuple[str, Any], ...]) -> NodeSettings:
    """This node's checked settings (its data file is checked once per process, not per message)."""
    return read_node_config(settings, dict(node_config))


@functools.lru_cache(maxsize=8)
def client_side(settings: Settings, node: NodeSettings, label_names: tuple[str, ...] | None) -> ClientSide:
    """What this node trains with, built once per process (the workspace itself is cached by its key)."""
    trainer = WorkspaceTrainer(node_workspace_key(settings, node, label_names), settings.train, settings.seed,
                               reload_per_call=settings.simulation.reload_model_per_call)
    return ClientSide(trainer=trainer, compressor=_compressor(settings.compression), faults=settings.faults,
                      seed=settings.seed)


def handle_train(msg: Message, context: Context, settings: Settings) -> Message:
    """Train this client's adapter from the server's assignment and reply with the (encoded) result."""
    node = _node(settings, tuple(sorted(context.node_config.items())))
    side = client_side(settings, node, _label_names(context))
    store = ContextStore(context, client_state_dir(settings, context, node.client_id))
    reply = train_round(records.to_packet(msg.content), node.client_id, side, store)
    return Message(records.to_content(reply), reply_to=msg)


def _settings(closure: Settings | None, context: Context) -> Settings:
    """The run's settings; a simulation's actor leaves Ctrl-C to the driver, which stops the run cleanly."""
    settings = resolve_settings(closure, context.run_config)
    if not settings.deployment:
        prepare_actor()
    return settings


def make_client_app(settings: Settings | None = None) -> ClientApp:
    """Build the ClientApp; ``settings`` of the run (``None``: read them from the run config)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_hello(msg, context, _settings(settings, context))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, _settings(settings, context))

    return app


# Deployment entry point (`flwr run`): the config arrives in the run config.
app = make_client_app(None)
