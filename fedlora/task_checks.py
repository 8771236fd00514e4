"""Validation of the task-specific configuration: the task, instruction data, decoder options.

Called by :func:`fedlora.config.validate` before anything starts, in the same style: every
problem names the field, the bad value and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.core.env import hub_offline
from fedlora.core.metrics import TASK_METRICS, task_kind

if TYPE_CHECKING:
    from fedlora.config import _Problems


def model_fits_task(name: Any, task: str, p: _Problems) -> bool:
    """The built-in models each serve one task; say which to use instead."""
    from fedlora.runtime.models import MINILM_NAMES  # noqa: PLC0415
    from fedlora.runtime.tiny_decoder import TINY_NAME  # noqa: PLC0415

    if task == "causal_lm" and name in MINILM_NAMES:
        p.add("model.name", name, "MiniLM is an encoder for classification; with task=causal_lm use a "
              "decoder: model=tiny_decoder (offline), model=tinyllama, model=qwen2_5_0_5b or "
              "model=llama3_2_1b")
        return False
    if task == "classification" and name == TINY_NAME:
        p.add("model.name", name, "the tiny random decoder is for task=causal_lm; for classification use "
              "model=minilm or model=hf")
        return False
    return True


def check_decoder_options(cfg: Mapping[str, Any], p: _Problems) -> None:
    """dtype, gradient checkpointing and 4-bit loading (QLoRA: bitsandbytes and a CUDA GPU)."""
    import importlib.util  # noqa: PLC0415

    from fedlora.runtime.models import DTYPES  # noqa: PLC0415

    model = cfg.get("model") or {}
    dtype = model.get("dtype", "float32")
    if dtype != "auto" and dtype not in DTYPES:
        p.add("model.dtype", dtype, "use auto (bfloat16 on a GPU, else float32) or one of "
              + ", ".join(DTYPES))
    checkpointing = model.get("gradient_checkpointing", False)
    if checkpointing != "auto" and not isinstance(checkpointing, bool):
        p.add("model.gradient_checkpointing", checkpointing, "use auto (on for a GPU), true or false")
    four_bit = model.get("load_in_4bit", False)
    if not isinstance(four_bit, bool):
        p.add("model.load_in_4bit", four_bit, "use true or false")
    elif four_bit:
        _check_4bit(cfg, p, importlib.util.find_spec("bitsandbytes") is not None)


def _check_4bit(cfg: Mapping[str, Any], p: _Problems, have_bitsandbytes: bool) -> None:
    import torch  # noqa: PLC0415

    if task_kind(cfg) != "causal_lm":
        p.add("model.load_in_4bit", True, "a 4-bit base is for task=causal_lm; set it to false")
    if not have_bitsandbytes:
        p.add("model.load_in_4bit", True, "needs the bitsandbytes package: `pip install bitsandbytes` "
              "(on a machine with a CUDA GPU), or set it to false")
    if not torch.cuda.is_available():
        p.add("model.load_in_4bit", True, "needs a CUDA GPU (bitsandbytes 4-bit layers run on CUDA) and "
              "none is visible; set it to false (model.dtype=auto gives bf16 on a GPU, fp32 on the CPU)")


def check_task(cfg: Mapping[str, Any], p: _Problems) -> None:
    """``task.kind``, and for causal_lm the prompt templates and the generation settings."""
    from fedlora.runtime.training.sft import template_problems  # noqa: PLC0415

    kind = task_kind(cfg)
    if kind not in TASK_METRICS:
        p.add("task.kind", kind, "use task=classification or task=causal_lm")
        return
    if kind != "causal_lm":
        return
    task = cfg.get("task") or {}
    fields = {"prompt_with_input": {"instruction", "input"}, "prompt_without_input": {"instruction"}}
    for key, required in fields.items():
        template = task.get(key)
        why = "must be a string" if not isinstance(template, str) else \
            template_problems(template, required, required)
        if why:
            p.add(f"task.{key}", template, why)
    for key, low in (("num_generations", 0), ("max_new_tokens", 1)):
        v = task.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            p.add(f"task.{key}", v, f"use an integer >= {low}")


def check_instruction_data(cfg: Mapping[str, Any], p: _Problems) -> None:
    """Instruction data for task=causal_lm: the layout, and a category when the partition is Dirichlet."""
    from fedlora.runtime.data import datasets as ds  # noqa: PLC0415
    from fedlora.runtime.data import instructions as ins  # noqa: PLC0415

    data = cfg.get("data", {})
    name, fmt = data.get("name"), data.get("format", "auto")
    if fmt not in ins.FORMATS:
        p.add("data.format", fmt, f"use one of {', '.join(ins.FORMATS)} (auto reads the layout from the "
              "columns)")
        return
    if not isinstance(name, str) or not name or name == ds.BUILTIN_BBC:
        p.add("data.name", name, "task=causal_lm needs instruction data: data=synthetic_instructions "
              "(offline), data=instructions_file data.name=<file.json|.jsonl>, or data=instructions_hub "
              "data.name=<dataset>")
        return
    if name != ins.BUILTIN_SYNTHETIC and ds.is_local_file(name):
        columns = _instruction_file_columns(name, p)
    elif name != ins.BUILTIN_SYNTHETIC:
        if hub_offline():
            p.add("data.name", name, "unknown instruction data: not synthetic_instructions nor a local "
                  ".json/.jsonl file, and hub access is off (HF_HUB_OFFLINE=1); give a local file or set "
                  "offline=false")
        return  # a hub dataset's columns are checked when it is loaded
    else:
        columns = ins.instruction_columns(name)
    if columns is None:
        return
    try:
        ins.detect_format(columns, fmt)
    except ds.DataError as exc:
        field, value = ("data.name", name) if fmt == "auto" else ("data.format", fmt)
        p.add(field, value, str(exc))
    part, n = cfg.get("partition") or {}, cfg.get("num_clients")
    category = data.get("category_column", "category")
    if part.get("kind") == "dirichlet" and isinstance(n, int) and n > 1 and category not in columns:
        p.add("partition.kind", "dirichlet", f"a Dirichlet partition skews clients by a category, and {name} "
              f"has no {category!r} column (data.category_column); use partition=iid, or data whose records "
              "have a category (Dolly's category, or name the column with data.category_column)")


def _instruction_file_columns(name: str, p: _Problems) -> list[str] | None:
    from fedlora.runtime.data import datasets as ds  # noqa: PLC0415
    from fedlora.runtime.data import instructions as ins  # noqa: PLC0415

    if Path(name).suffix.lower() not in ins.INSTRUCTION_SUFFIXES:
        p.add("data.name", name, "instruction files are JSON: a .json array of records or a .jsonl file")
        return None
    if not Path(name).is_file():
        p.add("data.name", name, "the file does not exist; give an existing path (absolute, or relative "
              "to where you run fedlora)")
        return None
    try:
        return ins.instruction_columns(name)
    except (ds.DataError, ValueError, OSError) as exc:
        p.add("data.name", name, f"cannot be read: {exc}")
        return None
