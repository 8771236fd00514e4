"""Causal-LM instruction tuning of a decoder: response-only loss, held-out perplexity, generations.

Instruction/response records (Alpaca or Dolly layout, or the built-in synthetic set) are rendered
with the prompt templates and tokenized with labels on the response tokens only; the metrics are
``test_loss`` (mean cross-entropy per response token), ``test_perplexity`` (``exp`` of it, the
primary one) and ``test_tokens``. After every round a few fixed held-out prompts are completed
greedily, so a user can read how the model changes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedlora.core.env import hub_offline
from fedlora.core.errors import Problems
from fedlora.core.metrics import PERPLEXITY
from fedlora.runtime.data import datasets as ds
from fedlora.runtime.data import instructions as ins
from fedlora.runtime.data.settings import DataSettings, NodeData
from fedlora.runtime.models import MINILM_NAMES, ModelSettings, load_tokenizer
from fedlora.runtime.tasks.base import AddProblem, GenerationPrompt, Prepared, Task, TaskSettings
from fedlora.runtime.training import sft


class CausalLMTask(Task):
    """Instruction tuning of a decoder: response-token loss, perplexity and sample generations."""

    kind = "causal_lm"
    metric = PERPLEXITY
    decoder = True
    builtin_model = "model=tiny_decoder"

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self.template = sft.PromptTemplate(settings.prompt_with_input, settings.prompt_without_input)
        self.records: tuple[ins.Instruction, ...] = ()
        self.tokenizer: Any = None
        self.max_length = 0

    # -- configuration checks ---------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: Mapping[str, Any], p: Problems) -> None:
        """The prompt templates (their ``{fields}``) and the generation settings."""
        task = cfg.get("task") or {}
        fields = {"prompt_with_input": {"instruction", "input"}, "prompt_without_input": {"instruction"}}
        for key, required in fields.items():
            template = task.get(key)
            why = "must be a string" if not isinstance(template, str) else \
                sft.template_problems(template, required, required)
            if why:
                p.add(f"task.{key}", template, why)
        for key, low in (("num_generations", 0), ("max_new_tokens", 1)):
            v = task.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                p.add(f"task.{key}", v, f"use an integer >= {low}")

    @classmethod
    def check_model(cls, name: Any, p: Problems) -> bool:
        """MiniLM is an encoder; a causal LM needs a decoder."""
        if name in MINILM_NAMES:
            p.add("model.name", name, "MiniLM is an encoder for classification; with task=causal_lm use a "
                  "decoder: model=tiny_decoder (offline), model=tinyllama, model=qwen2_5_0_5b or "
                  "model=llama3_2_1b")
            return False
        return True

    @classmethod
    def check_data(cls, cfg: Mapping[str, Any], p: Problems) -> None:
        """Instruction data: the layout, and a category when the partition is Dirichlet."""
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
        if part.get("kind") in ("dirichlet", "inner_dirichlet") and isinstance(n, int) and n > 1 \
                and category not in columns:
            p.add("partition.kind", part["kind"], f"a Dirichlet partition skews clients by a category, and {name} "
                  f"has no {category!r} column (data.category_column); use partition=iid, or data whose records "
                  "have a category (Dolly's category, or name the column with data.category_column)")

    @classmethod
    def check_node_file(cls, path: str, data: Mapping[str, Any], key: str, add: AddProblem) -> None:
        """A .json/.jsonl file of instruction records in the run's layout."""
        suffixes = ins.INSTRUCTION_SUFFIXES
        if Path(path).suffix.lower() not in suffixes:
            add(key, path, f"use a {'/'.join(s[1:] for s in suffixes)} file of instruction records "
                "(task=causal_lm)")
        elif not Path(path).is_file():
            add(key, path, "no such file on this node; give an absolute path to an existing file")
        else:
            try:
                ins.detect_format(ins.instruction_columns(path), str(data.get("format", "auto")))
            except ds.DataError as exc:
                add(key, path, str(exc))

    # -- data, evaluation, generation ----------------------------------------------------------------
    def prepare_node(self, node: NodeData, data: DataSettings, model: ModelSettings) -> Prepared:
        """A deployed node's own instruction file (JSON/JSONL, the run's ``data.format``): all of it trains."""
        return self.prepare(dataclasses.replace(data, name=node.path, max_examples=None), model)

    @staticmethod
    def _records(data: DataSettings) -> ins.InstructionSet:
        return ins.load_instructions(data.name, fmt=data.format, split=data.split,
                                     category_column=data.category_column, max_examples=data.max_examples,
                                     drop_incomplete=data.drop_incomplete)

    @staticmethod
    def _grouped(iset: ins.InstructionSet) -> tuple[tuple[int, ...], tuple[str, ...], bool]:
        """Each record's category index, the category names, and whether the records have categories."""
        names = iset.categories
        if names is None:
            return (0,) * len(iset.records), ("all",), False
        index = {name: i for i, name in enumerate(names)}
        return tuple(index[str(r.category)] for r in iset.records), names, True

    def groups(self, data: DataSettings) -> tuple[tuple[int, ...], bool]:
        """The category of each record (all zeros without categories)."""
        groups, _, has = self._grouped(self._records(data))
        return groups, has

    def prepare(self, data: DataSettings, model: ModelSettings) -> Prepared:
        """Load the instruction records, render their prompts, tokenize with response-only labels."""
        iset = self._records(data)
        self.records, self.max_length = iset.records, model.max_length
        self.tokenizer = load_tokenizer(model.name)
        examples, truncated = [], 0
        for record in self.records:
            prompt = self.template.render(record.instruction, record.input)
            ids, labels, cut = sft.encode_example(self.tokenizer, prompt, record.output, model.max_length)
            examples.append((ids, labels))
            truncated += cut
        encoded = sft.SFTEncoded.from_examples(examples, self.tokenizer.pad_token_id)
        groups, names, has = self._grouped(iset)
        return Prepared(encoded, groups, names, has, 0, truncated)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, data: sft.SFTEncoded, indices: list[int], batch_size: int,
                 ) -> dict[str, float]:
        """Held-out ``test_loss`` (mean cross-entropy over all response tokens), its ``exp``, the count.

        The mean is over tokens, not over batches or examples, so it does not depend on the batch
        size; position ``t`` predicts token ``t + 1`` (the labels are shifted by one).
        """
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(indices), batch_size):
            batch = data.batch(indices[start:start + batch_size], device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]  # (B, L-1): the token each position predicts
            total += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=sft.IGNORE, reduction="sum"))
            count += int((targets != sft.IGNORE).sum())
        loss = total / count if count else math.nan
        return {"test_loss": loss, "test_perplexity": math.exp(loss) if count else math.nan,
                "test_tokens": count}

    def generation_prompts(self, test: list[int]) -> list[GenerationPrompt]:
        """Pick ``num_generations`` held-out examples, taking the categories in turn (fixed per run)."""
        by_category: dict[str | None, list[int]] = {}
        for i in test:
            by_category.setdefault(self.records[i].category, []).append(i)
        queues = [by_category[c] for c in sorted(by_category, key=str)]
        chosen: list[int] = []
        while len(chosen) < min(self.settings.num_generations, len(test)):
            for queue in queues:
                if queue and len(chosen) < self.settings.num_generations:
                    chosen.append(queue.pop(0))
        return [self._prompt(i) for i in chosen]

    def _prompt(self, index: int) -> GenerationPrompt:
        record = self.records[index]
        prompt = self.template.render(record.instruction, record.input)
        ids = sft.encode_prompt(self.tokenizer, prompt, self.max_length)
        return GenerationPrompt(index, prompt, record.output, record.category, tuple(ids))

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: list[GenerationPrompt]) -> list[dict[str, Any]]:
        """Greedy completions of ``prompts`` (one left-padded batch), cut at the first EOS."""
        if not prompts:
            return []
        from transformers import GenerationConfig  # noqa: PLC0415

        model.eval()
        tok = self.tokenizer
        device = next(model.parameters()).device
        input_ids, mask = sft.left_pad([list(p.ids) for p in prompts], tok.pad_token_id)
        config = GenerationConfig(max_new_tokens=self.settings.max_new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             generation_config=config)
        rows = []
        for p, new in zip(prompts, out[:, input_ids.shape[1]:].tolist(), strict=True):
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
            rows.append({"example": p.index, "category": p.category, "prompt": p.prompt,
                         "reference": p.reference, "output": tok.decode(new, skip_special_tokens=True)})
        return rows


def _instruction_file_columns(name: str, p: Problems) -> list[str] | None:
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
