"""Per-process workspace: model host, tokenized corpus, split and partitions, built once.

Ray actors and the server process each build one :class:`Workspace` per distinct
:class:`WorkspaceKey` and reuse it across clients and rounds (``functools.lru_cache``; the cache
lives per process, which is what we want: one base model per worker). The task
(:mod:`fedlora.runtime.tasks`) decides how the data are read and tokenized; the split and the
partitions follow each example's group (its class, or its instruction category).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from fedlora.core import seeds
from fedlora.core.metrics import validation_key
from fedlora.runtime.data import datasets as ds
from fedlora.runtime.data.partition import partition_indices
from fedlora.runtime.data.settings import DataSettings, NodeData
from fedlora.runtime.models import AdapterHost, ModelSettings
from fedlora.runtime.tasks import TaskSettings, make_task


@dataclass(frozen=True)
class WorkspaceKey:
    """Everything that determines a workspace.

    ``node_data`` is set on a deployed node that trains on its own file (node-config
    ``data-path``); ``data`` then still names the run's dataset, which that node does not read.
    """

    model: ModelSettings
    data: DataSettings
    num_clients: int
    seed: int
    task: TaskSettings = TaskSettings()
    node_data: NodeData | None = None


@dataclass(frozen=True)
class Split:
    """Which examples are held out for the test set and for validation, which each client trains on and
    which each client holds out to evaluate on (corpus indices; ``client_tests`` is empty, or one list per
    client, when ``data.client_test_fraction > 0``)."""

    train: list[int]
    test: list[int]
    partitions: list[list[int]]
    validation: list[int] = field(default_factory=list)
    client_tests: list[list[int]] = field(default_factory=list)


def hold_out_client_tests(parts: list[list[int]], fraction: float, split_seed: int,
                          ) -> tuple[list[list[int]], list[list[int]]]:
    """Each client's partition cut into what it trains on and what it evaluates on: a seeded draw of
    ``max(1, round(fraction * n_k))`` of its ``n_k`` examples (at least one of each, so ``n_k >= 2``).

    The draw is per client and not stratified: a client of a skewed partition evaluates on its own mix
    of labels, which is the point of evaluating there.

    Raises
    ------
    DataError
        When a client holds fewer than two examples.
    """
    trains, tests = [], []
    for cid, part in enumerate(parts):
        if len(part) < 2:
            raise ds.DataError(f"data.client_test_fraction={fraction:g}: client {cid} holds {len(part)} example(s), "
                               "and needs at least 2 (one to train on, one to evaluate on); raise "
                               "partition.min_partition_size, use fewer clients, or set data.client_test_fraction=0")
        n_test = min(len(part) - 1, max(1, round(fraction * len(part))))
        held = set(seeds.client_test_split(split_seed, cid).sample(range(len(part)), n_test))
        trains.append([x for i, x in enumerate(part) if i not in held])
        tests.append([x for i, x in enumerate(part) if i in held])
    return trains, tests


def split_and_partition(groups: tuple[int, ...], has_groups: bool, data: DataSettings, num_clients: int) -> Split:
    """The stratified test split (capped at ``data.max_test_examples``), the validation split (``data.
    validation_fraction`` of the training split, at most ``data.max_validation_examples``) and the clients'
    partitions.

    The same function serves the workspace and the configuration check, which runs it before
    anything starts so that an impossible partition is a configuration error, not a traceback later.

    Raises
    ------
    DataError
        When there are fewer training examples than clients, when a Dirichlet partition has no
        group to skew by, or when no draw gives every client ``min_partition_size`` examples.
    """
    train, test = ds.stratified_split(groups, data.test_fraction, data.split_seed)
    if data.max_test_examples is not None and data.max_test_examples < len(test):
        # a seeded, stratified subsample (a prefix of the sorted indices would be one class)
        labels = [groups[i] for i in test]
        _, keep = ds.stratified_split(labels, data.max_test_examples / len(test), data.split_seed)
        test = sorted(test[i] for i in keep)
    validation: list[int] = []
    if data.validation_fraction > 0:
        # stratified like the test split, from the training split, so that no client trains on it; a seed of
        # its own (split_seed + 1), so the test set is the same with or without validation
        kept, held = ds.stratified_split([groups[i] for i in train], data.validation_fraction, data.split_seed + 1)
        if data.max_validation_examples is not None and data.max_validation_examples < len(held):
            # hold out fewer (stratified, seeded); the others stay in the training split, for the clients
            chosen = ds.stratified_take([groups[train[i]] for i in held], data.max_validation_examples,
                                        data.split_seed + 1)
            picked = {held[i] for i in chosen}
            kept, held = sorted([*kept, *(i for i in held if i not in picked)]), sorted(picked)
        train, validation = [train[i] for i in kept], [train[i] for i in held]
        if not validation:
            raise ds.DataError(f"data.validation_fraction={data.validation_fraction:g} holds out no example of the "
                               f"{len(kept)} in the training split; use a larger fraction, e.g. 0.1, or 0 for none")
    try:
        return _partition(groups, has_groups, data, num_clients, train, test, validation)
    except ds.DataError as exc:
        if not validation:
            raise
        raise ds.DataError(f"{exc} (data.validation_fraction={data.validation_fraction:g} holds out "
                           f"{len(validation)} examples; a smaller one leaves more to the clients)") from exc


def _partition(groups: tuple[int, ...], has_groups: bool, data: DataSettings, num_clients: int, train: list[int],
               test: list[int], validation: list[int]) -> Split:
    """The clients' partitions of ``train`` (:func:`split_and_partition`'s second half)."""
    if len(train) < num_clients:
        raise ds.DataError(f"num_clients={num_clients}: the training split of data.name={data.name!r} holds only "
                           f"{len(train)} examples (after the test split); use at most {len(train)} clients, or more "
                           "data")
    train_labels = [groups[i] for i in train]
    if num_clients == 1:
        parts = [list(range(len(train)))]
    else:
        if data.partition in ("dirichlet", "inner_dirichlet") and not has_groups:
            raise ds.DataError(f"partition.kind={data.partition!r} needs a category to skew by, and data.name="
                               f"{data.name!r} has no {data.category_column!r} column; use "
                               "partition=iid or set data.category_column")
        need = num_clients * data.min_partition_size
        if data.partition in ("dirichlet", "inner_dirichlet") and need > len(train):
            raise ds.DataError(f"partition.min_partition_size={data.min_partition_size}: {num_clients} clients x "
                               f"{data.min_partition_size} = {need} examples, but the training split holds "
                               f"{len(train)}; lower partition.min_partition_size or use fewer clients")
        parts = partition_indices(train_labels, num_clients, kind=data.partition, alpha=data.alpha,
                                  seed=data.partition_seed, min_partition_size=data.min_partition_size,
                                  size_sigma=data.size_sigma)
    partitions = [[train[i] for i in part] for part in parts]
    if data.client_test_fraction <= 0:
        return Split(train, test, partitions, validation)
    partitions, client_tests = hold_out_client_tests(partitions, data.client_test_fraction, data.split_seed)
    return Split(sorted(i for part in partitions for i in part), test, partitions, validation, client_tests)


class Workspace:
    """The loaded model host and data of one process."""

    def __init__(self, key: WorkspaceKey) -> None:
        self.key = key
        self.task = make_task(key.task)
        if key.node_data is not None:
            self._init_node_data(key, key.node_data)
            return
        prepared = self.task.prepare(key.data, key.model)
        self.data = prepared.data
        self.label_names = prepared.group_names
        self.truncated = prepared.truncated
        split = split_and_partition(prepared.groups, prepared.has_groups, key.data, key.num_clients)
        self.train, self.test, self.partitions = split.train, split.test, split.partitions
        self.validation = split.validation
        self.client_tests = split.client_tests
        self.num_labels = prepared.num_labels
        self.generation_prompts = self.task.generation_prompts(self.test)
        self.host = AdapterHost(key.model, prepared.num_labels, key.seed)

    def _init_node_data(self, key: WorkspaceKey, node: NodeData) -> None:
        """Load a node's own file: all of it is this node's training partition, no test split."""
        prepared = self.task.prepare_node(node, key.data, key.model)
        self.data = prepared.data
        self.label_names = prepared.group_names
        self.truncated = prepared.truncated
        self.train = list(range(len(prepared.groups)))
        self.test = []
        self.validation: list[int] = []
        self.client_tests: list[list[int]] = []
        if key.data.client_test_fraction > 0:  # the node evaluates on a share of its own file
            parts, self.client_tests = hold_out_client_tests([self.train], key.data.client_test_fraction,
                                                             key.data.split_seed)
            self.train = parts[0]
        self.partitions = [self.train]
        self.num_labels = prepared.num_labels
        self.generation_prompts = []
        self.host = AdapterHost(key.model, prepared.num_labels, key.seed)

    def reload_host(self) -> None:
        """Load the base model again into a new host (benchmark switch, see ``bench/overhead.py``).

        The platform never needs this: one host per process serves every client. It reproduces the
        common pattern of a client that builds its model on every call
        (``simulation.reload_model_per_call=true``), to measure what the sharing saves. The tokenized
        data stay cached; base merges are re-applied from the client's history on the next
        ``set_base`` (a new host starts with no base version).
        """
        self.host = None  # drop the old model before loading the next one (peak memory)
        self.host = AdapterHost(self.key.model, self.num_labels, self.key.seed)

    def evaluate(self, batch_size: int = 64) -> dict[str, float]:
        """The task's metrics of the host's active model on the held-out set."""
        return self.evaluate_indices(self.test, batch_size)

    def evaluate_validation(self, batch_size: int = 64) -> dict[str, float]:
        """The task's metrics on the validation split, named ``val_*`` (``test_accuracy`` -> ``val_accuracy``);
        empty without one (``data.validation_fraction=0``)."""
        if not self.validation:
            return {}
        metrics = self.evaluate_indices(self.validation, batch_size)
        return {validation_key(key): value for key, value in metrics.items()}

    def generate(self) -> list[dict]:
        """The active model's completions of the fixed held-out prompts (none for classification)."""
        return self.task.generate(self.host.model, self.generation_prompts)

    def partition(self, client_id: int) -> list[int]:
        """Return the corpus indices client ``client_id`` trains on (a node's own file: all of it, less what it
        holds out to evaluate on)."""
        if self.key.node_data is not None:
            return self.train
        return self.partitions[client_id]

    def client_test(self, client_id: int) -> list[int]:
        """Return the corpus indices client ``client_id`` evaluates on (empty: ``data.client_test_fraction=0``)."""
        if not self.client_tests:
            return []
        return self.client_tests[0 if self.key.node_data is not None else client_id]

    def evaluate_indices(self, indices: list[int], batch_size: int = 64) -> dict[str, float]:
        """The task's metrics of the host's active model on the examples ``indices``."""
        return self.task.evaluate(self.host.model, self.data, indices, batch_size)


@functools.lru_cache(maxsize=2)
def get_workspace(key: WorkspaceKey) -> Workspace:
    """Return this process's workspace for ``key`` (built on first use)."""
    return Workspace(key)
