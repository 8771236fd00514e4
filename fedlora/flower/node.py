"""A deployed node's own settings: its ``--node-config``, checked on the node itself.

In simulation Flower writes each node's config (``partition-id``, ``num-partitions``). In a
deployment the operator of each SuperNode writes it by hand, on a machine the server cannot see,
so a mistake there must be reported by that node, naming the key, the value and the fix; the
server turns the failed hello into an error that stops the run before round 1.

Keys (``fedlora.federation.keys``): ``partition-id`` (required: the client id, ``0..num_clients-1``, unique
in the run: it picks the built-in partition, seeds the client and names it in
``metrics.jsonl``), ``num-partitions`` (optional, must equal the run's ``num_clients``),
``rank``, ``data-path`` (the node's own training file; without it the node trains on its
partition of the run's dataset, a demo), ``state-dir`` (the root of the state that must
survive a kill) and ``node-worker`` (``false``: answer every message in its own ``flwr-clientapp``
process, without the long-lived node worker of :mod:`fedlora.flower.node_worker`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlora.config.settings import Settings
from fedlora.core.errors import ConfigError
from fedlora.federation import keys
from fedlora.runtime.data.settings import NodeData
from fedlora.runtime.tasks import task_class
from fedlora.runtime.training.workspace import WorkspaceKey

KNOWN_KEYS = (keys.PARTITION_ID, keys.NUM_PARTITIONS, keys.NODE_RANK, keys.NODE_DATA, keys.NODE_STATE_DIR,
              keys.NODE_WORKER)


class NodeConfigError(ConfigError):
    """Problems in one SuperNode's ``--node-config``, all reported at once."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems, subject="this SuperNode's --node-config")


@dataclass(frozen=True)
class NodeSettings:
    """What one node's config says: its client id and, optionally, rank, data file, state dir."""

    client_id: int
    rank: int | None = None
    data_path: str | None = None
    state_dir: str | None = None
    worker: bool = True  # use the long-lived node worker (node-config node-worker=false: no)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_node_config(settings: Settings, node_config: Mapping[str, Any]) -> NodeSettings:
    """Check ``node_config`` against the run's settings; return the node's settings.

    Raises :class:`NodeConfigError` listing every problem.
    """
    problems: list[str] = []

    def add(key: str, value: Any, fix: str) -> None:
        problems.append(f"{key}={value!r}: {fix}")

    for key in sorted(set(node_config) - set(KNOWN_KEYS)):
        add(key, node_config[key], f"not a fedlora node-config key; the keys are {', '.join(KNOWN_KEYS)}")
    num_clients = settings.loop.num_clients
    data_path = node_config.get(keys.NODE_DATA)
    cid = node_config.get(keys.PARTITION_ID)
    if cid is None:
        add(keys.PARTITION_ID, cid, "every node needs its own client id: --node-config 'partition-id=0' "
            "(1, 2, ...)")
    elif not _is_int(cid) or cid < 0:
        add(keys.PARTITION_ID, cid, "use an integer >= 0, different on every node")
    elif cid >= num_clients:
        add(keys.PARTITION_ID, cid, f"the run has num_clients={num_clients}, so client ids are "
            f"0..{num_clients - 1}: use one of those (each node its own), or deploy with a larger num_clients")
    parts = node_config.get(keys.NUM_PARTITIONS)
    if parts is not None and parts != num_clients:
        add(keys.NUM_PARTITIONS, parts, f"the run has num_clients={num_clients}: set "
            f"num-partitions={num_clients} or leave it out")
    rank = node_config.get(keys.NODE_RANK)
    if rank is not None and (not _is_int(rank) or rank < 1):
        add(keys.NODE_RANK, rank, "a LoRA rank is an integer >= 1 (for example rank=8), or leave it out to use "
            "the run's rank policy")
    if data_path is not None:
        if not isinstance(data_path, str) or not data_path:
            add(keys.NODE_DATA, data_path, "give the path of this node's training file in quotes: "
                'data-path="/data/train.csv"')
        else:
            task_class(settings.task.kind).check_node_file(data_path, dataclasses.asdict(settings.data),
                                                           keys.NODE_DATA, add)
    state_dir = node_config.get(keys.NODE_STATE_DIR)
    if state_dir is not None and (not isinstance(state_dir, str) or not state_dir):
        add(keys.NODE_STATE_DIR, state_dir, 'give a directory in quotes: state-dir="/var/lib/fedlora"')
    worker = node_config.get(keys.NODE_WORKER, True)
    if not isinstance(worker, bool):
        add(keys.NODE_WORKER, worker, "use node-worker=false to answer every message in its own flwr-clientapp "
            "process (no long-lived node worker), or leave it out")
    if problems:
        raise NodeConfigError(problems)
    return NodeSettings(int(cid), None if rank is None else int(rank),  # type: ignore[arg-type]
                        None if data_path is None else str(data_path),
                        None if state_dir is None else str(state_dir), bool(worker))


def node_rank(settings: Settings, node: NodeSettings) -> int:
    """The node-config ``rank``, else the run's rank policy for this client id."""
    return node.rank if node.rank is not None else settings.client_ranks()[node.client_id]


def node_workspace_key(settings: Settings, node: NodeSettings, label_names: tuple[str, ...] | None) -> WorkspaceKey:
    """Return the workspace key of this node: the run's, plus its own file when it has one.

    A node's own file is numbered by ``label_names``, the run's classes as the server's dataset
    numbers them (sent in the hello), never by the labels that happen to occur in the file.
    """
    key = settings.workspace_key()
    if node.data_path is None:
        return key
    if not label_names:
        raise RuntimeError("this node has its own data-path but did not receive the run's label names "
                           "(they come with the server's hello); start the run again")
    node_data = NodeData(node.data_path, settings.data.text_column, settings.data.label_column, tuple(label_names))
    return dataclasses.replace(key, node_data=node_data)
