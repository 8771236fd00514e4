"""The task registry: every task the platform runs, by its ``task.kind``.

A task is one module here (a :class:`~fedlora.runtime.tasks.base.Task` subclass), its line below,
a YAML in ``conf/task/`` and its tests. Everything that depends on the task (the metric, the kind
of model, data loading, evaluation, generations, the task's own configuration checks) is reached
through the class :func:`task_class` returns; nothing else compares task names.
"""

from __future__ import annotations

from fedlora.runtime.tasks.base import GenerationPrompt, Prepared, Task, TaskSettings
from fedlora.runtime.tasks.causal_lm import CausalLMTask
from fedlora.runtime.tasks.classification import ClassificationTask

TASKS: dict[str, type[Task]] = {cls.kind: cls for cls in (ClassificationTask, CausalLMTask)}

__all__ = ["TASKS", "CausalLMTask", "ClassificationTask", "GenerationPrompt", "Prepared", "Task", "TaskSettings",
           "make_task", "task_class"]


def task_class(kind: str) -> type[Task]:
    """The task class of ``kind`` (``ValueError`` naming the known kinds)."""
    if kind not in TASKS:
        raise ValueError(f"task.kind={kind!r}: use one of {', '.join(TASKS)}")
    return TASKS[kind]


def make_task(settings: TaskSettings) -> Task:
    """The task object of ``settings.kind``."""
    return task_class(settings.kind)(settings)
