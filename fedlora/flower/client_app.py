"""The ClientApp: handlers for the hello query, training and evaluation, forwarded to a node worker.

What a node computes for a message is Flower-free (:func:`fedlora.flower.node_worker.hello` and
:func:`~fedlora.flower.node_worker.train`, on top of :func:`fedlora.federation.client.train_round`);
this module turns the message and ``context.state`` into a request frame, has it answered and
writes the reply and the updated state back. What must survive between rounds when client
processes are short-lived lives in ``context.state``: the base merges applied (FLoRA), the
compression residual (error feedback) and the run's label names (from the hello).

Where the request is answered:

* in simulation (and in a ``flwr run`` simulation), in this process: a Ray actor keeps its
  workspace (base model, tokenized data) across clients and rounds;
* in a deployment, by the node's **worker** (:mod:`fedlora.flower.node_worker`): Flower 1.42
  runs every message in a new ``flwr-clientapp`` process, in both isolation modes, and none of
  its warm executors serves ClientApps (docs/deployment.md), so the ClientApp forwards the
  message over a Unix socket to a long-lived process next to the SuperNode that keeps the
  workspace. The first message that finds no worker starts one (detached, running the code of
  this run's FAB) and waits for it; if none can be reached the message is answered in this
  process, as before, with one log line saying so. The worker is off when fedlora-deploy ran
  with ``--no-node-worker`` or the node config says ``node-worker=false``. Started with
  ``fedlora-supernode``, the ``flwr-clientapp`` process itself was started before the message
  came (:mod:`fedlora.flower.superexec`), so Flower's imports are not paid per message either.

On the forwarding path this module imports flwr (already loaded by ``flwr-clientapp``), numpy and
:mod:`fedlora.serving.node_protocol`; torch, transformers and the fedlora runtime load only where
the request is answered in this process.

Surviving a kill: ``context.state`` dies with the run (or the SuperNode); a worker holds nothing
that is not in ``context.state`` or on disk. The base merges need nothing more (a resumed server
resends them all from its checkpoint). The residual is also written after every round to
``<state dir>/round_<t>.safetensors`` (:func:`fedlora.flower.node_worker.client_state_dir`), and a
client of a resumed run that has no residual in ``context.state`` loads the newest file at or
before the round the server resumed from.

Fault injection (``faults`` config group, :mod:`fedlora.core.faults`) happens in the client side of
a round: an injected failure raises (in the worker, it is raised again here with the same class
and message), which Flower turns into an error reply.
"""

from __future__ import annotations

import json
import os
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

from fedlora.federation import keys
from fedlora.flower.records import arrays_to_record, record_to_arrays
from fedlora.flower.secagg import as_vector_reply, is_secure, optional_secaggplus_mod
from fedlora.serving import node_protocol as proto

if TYPE_CHECKING:
    from fedlora.config.settings import Settings

Frame = tuple[dict[str, Any], dict[str, np.ndarray]]
NODE_WORKER = "node_worker"  # key of the deployment record (fedlora-deploy) that turns the worker on or off
WORKER_START_TIMEOUT = 120.0  # seconds a new worker may take to listen (imports on a busy machine)
WORKER_IDLE_TIMEOUT = 900.0  # a worker exits after this long without a message (it is only a cache)


# -- records <-> plain values (no torch) ------------------------------------------------------------
def request_frame(kind: str, msg: Message, context: Context) -> Frame:
    """The request for ``msg``: its content and ``context.state`` as plain values, the node config, the run."""
    records: dict[str, dict[str, np.ndarray]] = {}
    config: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    for name, record in msg.content.items():
        if name == RECORD_KEY_CONFIGS:  # SecAgg+'s, read by its mod
            continue
        if isinstance(record, ArrayRecord):
            records[name] = record_to_arrays(record)
        elif isinstance(record, ConfigRecord):
            config.update(dict(record))
        elif isinstance(record, MetricRecord):
            metrics.update(dict(record))
    state_arrays: dict[str, dict[str, np.ndarray]] = {}
    state_configs: dict[str, dict[str, Any]] = {}
    for name, record in context.state.items():
        if name == RECORD_KEY_STATE:  # SecAgg+'s keys and shares: its mod's, left where they are
            continue
        if isinstance(record, ArrayRecord):
            state_arrays[name] = record_to_arrays(record)
        elif isinstance(record, ConfigRecord):
            state_configs[name] = dict(record)
    header = {"kind": kind, "run": str(context.run_id), "node_config": dict(context.node_config),
              "content": {"records": list(records), "config": config, "metrics": metrics},
              "state": {"records": list(state_arrays), "configs": state_configs}}
    return header, {**proto.pack_records("msg", records), **proto.pack_records("state", state_arrays)}


def apply_reply(reply: Frame, msg: Message, context: Context) -> Message:
    """Write the returned state into ``context.state`` and build the reply (or raise the computation's error)."""
    header, arrays = reply
    if not header.get("ok"):
        if "error_class" not in header:
            raise RuntimeError(f"the fedlora node worker refused the request: {header.get('worker_error')}")
        if header.get("traceback"):
            log(WARNING, "fedlora node worker: %s", header["traceback"].rstrip())
        cls = type(header["error_class"].rsplit(".", 1)[-1], (RuntimeError,),
                   {"__module__": header["error_module"], "__qualname__": header["error_class"]})
        raise cls(header["error"])  # the same class name and message as in-process: Flower reports the same
    state = header["state"]
    for name, values in proto.unpack_records("state", arrays, state["records"]).items():
        context.state[name] = arrays_to_record(values)
    for name, values in state["configs"].items():
        context.state[name] = ConfigRecord(values)
    out = header["content"]
    content = RecordDict({name: arrays_to_record(values)
                          for name, values in proto.unpack_records("msg", arrays, out["records"]).items()})
    if out["config"]:
        content[keys.CONFIG] = ConfigRecord(dict(out["config"]))
    if out["metrics"]:
        content[keys.METRICS] = MetricRecord(dict(out["metrics"]))
    return Message(content, reply_to=msg)


# -- where a request is answered -------------------------------------------------------------------
def _in_process(header: dict[str, Any], arrays: dict[str, np.ndarray], settings: Settings | None) -> Frame:
    from fedlora.flower import node_worker  # noqa: PLC0415 - torch and the runtime: only when computing here

    return node_worker.handle(header, arrays, settings)


def _app_dir() -> str:
    """The directory this run's fedlora code was imported from (the installed FAB in a deployment)."""
    import fedlora  # noqa: PLC0415

    return str(Path(fedlora.__file__).resolve().parent.parent)


def _worker_wanted(raw: str, node_config: dict[str, Any]) -> bool:
    """Deployed (the config has fedlora-deploy's record), the run allows it and the node does not refuse."""
    deployment = json.loads(raw).get("deployment")
    if not isinstance(deployment, dict) or not deployment.get(NODE_WORKER, True):
        return False
    return node_config.get(keys.NODE_WORKER, True) is not False


def _via_worker(header: dict[str, Any], arrays: dict[str, np.ndarray], node_id: int) -> Frame | None:
    """The worker's reply; a worker is started when none answers. ``None``: no worker could answer."""
    from flwr.supercore.utils import get_flwr_home  # noqa: PLC0415 - loaded by flwr-clientapp already

    app_dir = _app_dir()
    path = proto.socket_path(str(get_flwr_home()), node_id, app_dir)
    try:
        return proto.call(path, header, arrays)
    except proto.WorkerUnavailable as exc:
        first = exc
    try:
        proc = proto.start_worker(path, app_dir, watch_pid=os.getppid(), idle_timeout=WORKER_IDLE_TIMEOUT)
    except (proto.WorkerUnavailable, OSError) as exc:
        log(WARNING, "fedlora: no node worker answered (%s; %s); training in this flwr-clientapp process", first, exc)
        return None
    log(INFO, "fedlora: started a node worker (pid %s) at %s (%s); log %s.log", proc.pid, path, first, path)
    for _ in range(2):
        if not proto.wait_until_listening(path, proc, WORKER_START_TIMEOUT):
            first = proto.WorkerUnavailable(f"the worker did not listen within {WORKER_START_TIMEOUT:g} s "
                                            f"(exit status {proc.poll()}); see {path}.log")
            break
        try:
            return proto.call(path, header, arrays)
        except proto.WorkerUnavailable as exc:
            first = exc
    log(WARNING, "fedlora: no node worker answered (%s); training in this flwr-clientapp process", first)
    return None


def serve(kind: str, msg: Message, context: Context, settings: Settings | None) -> Message:
    """Answer a hello (``kind="hello"``), a training message (``"train"``) or an evaluation (``"evaluate"``)."""
    t0 = time.perf_counter()
    header, arrays = request_frame(kind, msg, context)
    if settings is not None:  # simulation: this actor computes, and keeps its caches
        from fedlora.flower.actors import prepare_actor  # noqa: PLC0415

        prepare_actor()
        return apply_reply(_in_process(header, arrays, settings), msg, context)
    raw = context.run_config.get(keys.CLIENT_CONFIG)
    if not raw:
        raise RuntimeError(
            f"run config has no {keys.CLIENT_CONFIG!r}: start deployments with `fedlora-deploy`, which passes "
            "the resolved config in --run-config (docs/deployment.md)")
    header["config"] = str(raw)
    node_config = dict(context.node_config)
    if _worker_wanted(str(raw), node_config):
        from flwr.supercore.utils import get_flwr_home  # noqa: PLC0415

        header["flwr_home"] = str(get_flwr_home())
        reply = _via_worker(header, arrays, int(context.node_id))
        if reply is not None:
            out = apply_reply(reply, msg, context)
            log(INFO, "fedlora: %s answered by the node worker in %.3f s (%.3f s of them in the worker)", kind,
                time.perf_counter() - t0, float(reply[0].get("seconds", float("nan"))))
            return out
        return apply_reply(_in_process(header, arrays, None), msg, context)
    if json.loads(str(raw)).get("deployment"):
        from flwr.supercore.utils import get_flwr_home  # noqa: PLC0415

        header["flwr_home"] = str(get_flwr_home())
    else:  # a `flwr run` simulation: an actor of Flower's Ray backend
        from fedlora.flower.actors import prepare_actor  # noqa: PLC0415

        prepare_actor()
    return apply_reply(_in_process(header, arrays, None), msg, context)


def make_client_app(settings: Settings | None = None) -> ClientApp:
    """Build the ClientApp; ``settings`` of the run (``None``: read them from the run config)."""
    app = ClientApp(mods=[optional_secaggplus_mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return serve("hello", msg, context, settings)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return serve("evaluate", msg, context, settings)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = serve("train", msg, context, settings)
        if not is_secure(msg):
            return reply
        # a secure round: the mod quantizes (stochastically, from NumPy's global generator) and masks
        # the vector as soon as this returns; seeded from the message so a rerun or resume sums the same
        np.random.seed(int(cast(int, msg.content.config_records[keys.CONFIG][keys.SECURE_SEED])) % 2**32)  # noqa: NPY002
        metrics = reply.content.metric_records[keys.METRICS]
        weight = keys.SECURE_WEIGHT if keys.SECURE_WEIGHT in metrics else keys.NUM_EXAMPLES  # client-level DP: W
        return Message(as_vector_reply(reply.content, keys.SECURE, keys.METRICS, weight), reply_to=msg)

    return app


# Deployment entry point (`flwr run`): the config arrives in the run config.
app = make_client_app(None)
