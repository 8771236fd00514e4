"""What every task shares: its settings, its prepared data, and the hooks the platform calls.

A task decides how its data are read and tokenized, how a model is evaluated and what metric judges
it, which kind of model it needs, and how its part of the configuration is checked. The platform
reaches tasks only through the registry (:mod:`fedlora.runtime.tasks`) and these hooks; no other
module compares task names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fedlora.core.errors import Problems
from fedlora.core.metrics import Metric
from fedlora.runtime.data.settings import DataSettings, NodeData
from fedlora.runtime.models import ModelSettings
from fedlora.runtime.training import sft

#: ``add(key, value, fix)``: how a node-config check reports a problem.
AddProblem = Callable[[str, Any, str], None]


@dataclass(frozen=True)
class TaskSettings:
    """The ``task`` config group (hashable: part of the per-process workspace key)."""

    kind: str = "classification"
    prompt_with_input: str = sft.DEFAULT_WITH_INPUT
    prompt_without_input: str = sft.DEFAULT_WITHOUT_INPUT
    num_generations: int = 4  # held-out prompts generated from after every round (0: none)
    max_new_tokens: int = 32  # greedy decoding stops at EOS or after this many tokens


@dataclass(frozen=True)
class Prepared:
    """A task's tokenized data and, per example, the group that splits and partitions follow.

    ``groups`` holds the class (classification) or the category (instructions with a category
    column) of each example, else all zeros: the test split is stratified by it and a Dirichlet
    partition skews by it.
    """

    data: Any  # Encoded | sft.SFTEncoded: both have .batch(idx, device)
    groups: tuple[int, ...]
    group_names: tuple[str, ...]
    has_groups: bool
    num_labels: int  # the classifier head's outputs (0: no head)
    truncated: int = 0  # examples cut to model.max_length


@dataclass(frozen=True)
class GenerationPrompt:
    """A fixed held-out prompt that the model completes after every round."""

    index: int
    prompt: str
    reference: str
    category: str | None
    ids: tuple[int, ...]


class Task:
    """The hooks of a task; subclasses override what differs.

    Class attributes say what the rest of the platform needs to know before anything is loaded:
    the task's name in the config (``kind``), the metric that judges it, whether it fine-tunes a
    decoder (a causal LM: peft's ``CAUSAL_LM`` task and ``AutoModelForCausalLM``) or a sequence
    classifier, and the offline model to suggest.
    """

    kind: ClassVar[str]
    metric: ClassVar[Metric]
    decoder: ClassVar[bool]
    builtin_model: ClassVar[str]  # how a user selects the offline model, e.g. "model=tiny_decoder"

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings

    # -- configuration checks (before anything starts) -------------------------------------------
    @classmethod
    def check_config(cls, cfg: Mapping[str, Any], p: Problems) -> None:
        """The ``task`` group's own fields."""

    @classmethod
    def check_model(cls, name: Any, p: Problems) -> bool:
        """Whether model ``name`` can serve this task (``False`` after adding a problem)."""
        return True

    @classmethod
    def check_data(cls, cfg: Mapping[str, Any], p: Problems) -> None:
        """The ``data`` group (and the partition where it depends on the data)."""

    @classmethod
    def check_node_file(cls, path: str, data: Mapping[str, Any], key: str, add: AddProblem) -> None:
        """A deployed node's own training file (node config ``data-path``), checked on the node."""

    # -- data, evaluation, generation --------------------------------------------------------------
    def groups(self, data: DataSettings) -> tuple[tuple[int, ...], bool]:
        """Each example's group (its class or category) and whether there are groups, without tokenizing.

        What the test split and the partitions follow; the configuration check partitions with it
        before anything starts.
        """
        raise NotImplementedError

    def prepare(self, data: DataSettings, model: ModelSettings) -> Prepared:
        """Load and tokenize the run's data."""
        raise NotImplementedError

    def prepare_node(self, node: NodeData, data: DataSettings, model: ModelSettings) -> Prepared:
        """Load and tokenize a deployed node's own file (all of it trains)."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, data: Any, indices: list[int], batch_size: int) -> dict[str, float]:
        """The task's held-out metrics (``test_loss`` and the task's metric) on ``indices``."""
        raise NotImplementedError

    def generation_prompts(self, test: list[int]) -> list[GenerationPrompt]:  # noqa: ARG002
        """Fixed held-out prompts to complete after every round (none by default)."""
        return []

    def generate(self, model: torch.nn.Module, prompts: list[GenerationPrompt]) -> list[dict[str, Any]]:  # noqa: ARG002
        """Completions of ``prompts`` (none by default)."""
        return []
