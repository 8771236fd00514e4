"""The ClientApp: one handler for the hello query and one for training.

A client (a SuperNode; in simulation a Ray actor call) keeps, in ``context.state``, what must
survive between rounds when client processes are short-lived: the base merges it has applied
(FLoRA) and its compression residual (ComPEFT error feedback). The frozen base model and the
tokenized data live in a per-process cache (:func:`fedlora.runtime.training.workspace.get_workspace`).

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

Fault injection (``faults`` config group, :mod:`fedlora.core.faults`): before training the client may
raise (Flower turns it into an error reply), sleep (a straggler), and after training send a
malformed update, always uncompressed, so that the server's checks see exactly the defect.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.federation import keys
from fedlora.core import lora_math as lm
from fedlora.results.checkpoint import CLIENT_STATE_DIR, load_client_state, save_client_state
from fedlora.config import assign_ranks, compressor, train_settings
from fedlora.core.faults import FaultSettings, InjectedFault, corrupt_state, decide
from fedlora.flower import records
from fedlora.flower.node import NodeSettings, node_workspace_key, read_node_config
from fedlora.flower.settings import resolve_config
from fedlora.runtime.training.local import train_steps
from fedlora.runtime.training.workspace import get_workspace

_HISTORY = "fedlora-base-history"
_RESIDUAL = "fedlora-ef-residual"
_LABELS = "fedlora-label-names"


def _rank(cfg: Mapping[str, Any], node: NodeSettings) -> int:
    """The node-config ``rank``, else the run's rank policy for this client id."""
    if node.rank is not None:
        return node.rank
    return assign_ranks(int(cfg["num_clients"]), cfg["ranks"], int(cfg["seed"]))[node.client_id]


def _label_names(context: Context) -> tuple[str, ...] | None:
    """The run's label names the hello left in ``context.state`` (``None`` before the hello)."""
    if _LABELS not in context.state:
        return None
    return tuple(str(n) for n in context.state[_LABELS][keys.LABEL_NAMES])


def handle_hello(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """Check this node's config and data; tell the server its partition id, rank and examples.

    The hello carries the run's label names (the server's dataset numbers the classes); they
    are kept in ``context.state`` for the training messages, and a node whose data names its
    classes differently fails here, before any round.
    """
    node = read_node_config(cfg, context.node_config)
    conf = msg.content[keys.CONFIG] if keys.CONFIG in msg.content else ConfigRecord()
    names = tuple(str(n) for n in conf[keys.LABEL_NAMES]) if keys.LABEL_NAMES in conf else None
    if names is not None:
        context.state[_LABELS] = ConfigRecord({keys.LABEL_NAMES: list(names)})
    ws = get_workspace(node_workspace_key(cfg, node, names))
    if names is not None and tuple(ws.label_names) != names:
        raise RuntimeError(f"this node's dataset has the labels {list(ws.label_names)} but the server's has "
                           f"{list(names)}; give every node and the server the same data config")
    metrics = MetricRecord({keys.PARTITION_ID: node.client_id, keys.RANK: _rank(cfg, node),
                            keys.NUM_EXAMPLES: len(ws.partition(node.client_id))})
    return Message(RecordDict({keys.METRICS: metrics}), reply_to=msg)


def _apply_base(context: Context, content: RecordDict, host: Any) -> int:
    """Append the merges in ``content`` to this client's history; set the base; return version."""
    history = records.record_to_merges(context.state[_HISTORY]) if _HISTORY in context.state else []
    incoming = records.record_to_merges(content[keys.BASE]) if keys.BASE in content else []
    for index, merge in incoming:
        if index < len(history):
            continue  # already applied (a resend)
        if index != len(history):
            raise RuntimeError(f"base merge {index} arrived but this client holds only {len(history)}")
        history.append((index, merge))
    if incoming:
        context.state[_HISTORY] = records.merges_to_record(history)
    cumulative = lm.concat_merges([m for _, m in history]) if history else None
    host.set_base(len(history), cumulative)
    return len(history)


def _start_state(conf: ConfigRecord, content: RecordDict, spec: Any, rank: int) -> dict[str, torch.Tensor]:
    received = records.record_to_state(content[keys.ADAPTER])
    seed = int(conf[keys.INIT_SEED])
    if bool(conf[keys.FRESH]):
        head = {k: v for k, v in received.items() if not lm.is_lora_key(k)}
        return lm.fresh_state(spec.modules, rank, seed, head)
    if not bool(conf[keys.SEND_LORA_A]):
        for module, (_, n) in spec.modules.items():
            received[lm.lora_a_key(module)] = lm.init_lora_a(seed, module, rank, n)
    return received


def client_state_dir(cfg: Mapping[str, Any], context: Context, cid: int) -> Path:
    """Where this client keeps the state that must survive a kill (see the module docstring).

    In simulation: ``<run dir>/client_state/<client id>``. In a deployment the run directory is
    on the server's machine, so a node writes under its own root: the node-config ``state-dir``,
    else ``$FLWR_HOME/fedlora-state``, then ``<run name>/<client id>``: one directory per run,
    because the files are numbered by round and a later run must not mix with an earlier one.
    """
    run_dir = Path(str(cfg["output_dir"]))
    if keys.NODE_STATE_DIR in context.node_config:
        return Path(str(context.node_config[keys.NODE_STATE_DIR])) / run_dir.name / str(cid)
    if cfg.get("deployment"):
        from flwr.supercore.utils import get_flwr_home  # noqa: PLC0415

        return get_flwr_home() / "fedlora-state" / run_dir.name / str(cid)
    return run_dir / CLIENT_STATE_DIR / str(cid)


def _residual(context: Context, state_dir: Path, resume_round: int) -> dict[str, torch.Tensor] | None:
    """This client's error-feedback residual: ``context.state``, else (resumed run) its file."""
    if _RESIDUAL in context.state:
        return records.record_to_state(context.state[_RESIDUAL])
    if resume_round > 0:
        return load_client_state(state_dir, at_most=resume_round)
    return None


def _inject_faults(cfg: Mapping[str, Any], cid: int, server_round: int) -> str | None:
    """Fail or straggle as the ``faults`` config decides; return the corruption kind, if any."""
    settings = FaultSettings.from_config(cfg.get("faults"))
    decision = decide(settings, int(cfg["seed"]), server_round, cid)
    if decision.fail:
        raise InjectedFault(f"injected failure (faults.fail_prob={settings.fail_prob:g}, round {server_round}, "
                            f"client {cid})")
    if decision.delay_s > 0:
        time.sleep(decision.delay_s)
    return decision.corrupt


def handle_train(msg: Message, context: Context, cfg: Mapping[str, Any]) -> Message:
    """Train this client's adapter from the server's plan and reply with the (encoded) result."""
    t0 = time.perf_counter()
    conf = msg.content[keys.CONFIG]
    node = read_node_config(cfg, context.node_config)
    cid = node.client_id
    server_round = int(conf[keys.SERVER_ROUND])
    corrupt = _inject_faults(cfg, cid, server_round)
    rank = int(conf[keys.RANK])
    ws = get_workspace(node_workspace_key(cfg, node, _label_names(context)))
    if (cfg.get("simulation") or {}).get("reload_model_per_call"):
        ws.reload_host()  # benchmark-only switch: the common "load the model on every call" pattern
    host = ws.host
    version = _apply_base(context, msg.content, host)
    start = _start_state(conf, msg.content, host.spec(rank), rank)
    host.load_state(rank, start)
    params = host.set_trainable(rank, bool(conf[keys.TRAIN_LORA_A]))
    seed = int(cfg["seed"]) * 1_000_003 + server_round * 1009 + cid
    loss = train_steps(host.model, params, ws.data, ws.partition(cid), train_settings(cfg), seed)
    trained = host.get_state(rank)
    sent_keys = [k for k in trained if bool(conf[keys.SEND_LORA_A]) or not k.endswith(".lora_A.weight")]
    reply = RecordDict()
    comp = compressor(cfg)
    if corrupt is not None:
        sent = {k: trained[k] for k in sent_keys}
        reply[keys.ADAPTER] = records.state_to_record(corrupt_state(sent, start, corrupt))
    elif comp is None:
        reply[keys.ADAPTER] = records.state_to_record({k: trained[k] for k in sent_keys})
    else:
        delta = {k: trained[k] - start[k] for k in sent_keys}
        # The residual holds only the tensors that carry one (ComPEFT.carries): none when error
        # feedback is off, only the classifier head for FLoRA (fresh factors every round; a decoder
        # has no head, so nothing is kept or written then).
        state_dir = client_state_dir(cfg, context, cid)
        resume_round = int(conf.get(keys.RESUME_ROUND, 0))
        carried = any(comp.carries(k) for k in delta)
        residual = _residual(context, state_dir, resume_round) if carried else None
        payload, residual = comp.compress(delta, residual)
        if residual:
            context.state[_RESIDUAL] = records.state_to_record(residual)
            save_client_state(state_dir, server_round, residual)
        reply[keys.COMPRESSED] = records.numpy_to_record(records.pack_payload(payload, sorted(sent_keys)))
    reply[keys.METRICS] = MetricRecord({
        keys.TRAIN_LOSS: float(loss), keys.NUM_EXAMPLES: len(ws.partition(cid)), keys.RANK: rank,
        keys.BASE_VERSION: version, keys.TRAIN_SECONDS: time.perf_counter() - t0,
    })
    return Message(reply, reply_to=msg)


def make_client_app(config: Mapping[str, Any] | None = None) -> ClientApp:
    """Build the ClientApp; ``config`` is the resolved run config (``None``: read run_config)."""
    app = ClientApp()
    closure = dict(config) if config is not None else None

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_hello(msg, context, resolve_config(closure, context.run_config))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, resolve_config(closure, context.run_config))

    return app


# Deployment entry point (`flwr run`): the config arrives in the run config.
app = make_client_app(None)
