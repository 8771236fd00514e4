"""What a task is: how its data are prepared, how a model is evaluated, what metric judges it.

Two tasks share the platform (models, strategies, training loop and Flower glue):

- ``classification``: a text/label corpus, a classifier head; metrics ``test_loss`` and
  ``test_accuracy`` (the primary one);
- ``causal_lm``: instruction/response records, supervised fine-tuning with the loss on the response
  tokens only; metrics ``test_loss`` (mean cross-entropy per response token), ``test_perplexity``
  (``exp`` of it, the primary one) and ``test_tokens``; plus greedy generations for a few fixed
  held-out prompts, so a user can read how the model changes from round to round.

The glue sees only :func:`make_task` and the methods ``prepare``, ``evaluate``, ``generation_prompts``
and ``generate``, and the task's :class:`fedlora.core.metrics.Metric`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedlora.runtime.data import datasets as ds
from fedlora.runtime.data import instructions as ins
from fedlora.core.metrics import ACCURACY, PERPLEXITY, Metric
from fedlora.runtime.models import ModelSettings, load_tokenizer
from fedlora.runtime.training import sft
from fedlora.runtime.training.local import Encoded, evaluate

if TYPE_CHECKING:
    from fedlora.runtime.training.workspace import DataSettings, NodeData


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


class ClassificationTask:
    """Sequence classification: accuracy and cross-entropy on the held-out articles."""

    metric: Metric = ACCURACY

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings

    def prepare(self, data: DataSettings, model: ModelSettings) -> Prepared:
        """Load the corpus and tokenize it to ``model.max_length`` (padded, truncated)."""
        corpus = ds.load_corpus(data.name, text_column=data.text_column, label_column=data.label_column,
                                split=data.split, max_examples=data.max_examples)
        return self._tokenized(corpus, model)

    def prepare_node(self, node: NodeData, data: DataSettings, model: ModelSettings) -> Prepared:  # noqa: ARG002
        """A deployed node's own file, its labels numbered by the run's label names (not the file's)."""
        corpus = ds.load_local(node.path, node.text_column, node.label_column, node.label_names)
        return self._tokenized(corpus, model)

    @staticmethod
    def _tokenized(corpus: ds.Corpus, model: ModelSettings) -> Prepared:
        tokenizer = load_tokenizer(model.name)
        enc = tokenizer(list(corpus.texts), truncation=True, max_length=model.max_length,
                        padding="max_length", return_tensors="pt")
        encoded = Encoded(enc["input_ids"], enc["attention_mask"], torch.tensor(corpus.labels))
        return Prepared(encoded, corpus.labels, corpus.label_names, True, corpus.num_labels)

    def evaluate(self, model: torch.nn.Module, data: Encoded, indices: list[int], batch_size: int,
                 ) -> dict[str, float]:
        """``test_loss`` and ``test_accuracy`` on ``indices``."""
        loss, acc = evaluate(model, data, indices, batch_size)
        return {"test_accuracy": acc, "test_loss": loss}

    def generation_prompts(self, test: list[int]) -> list[GenerationPrompt]:  # noqa: ARG002
        """A classifier generates nothing."""
        return []

    def generate(self, model: torch.nn.Module, prompts: list[GenerationPrompt]) -> list[dict[str, Any]]:  # noqa: ARG002
        """A classifier generates nothing."""
        return []


class CausalLMTask:
    """Instruction tuning of a decoder: response-token loss, perplexity and sample generations."""

    metric: Metric = PERPLEXITY

    def __init__(self, settings: TaskSettings) -> None:
        self.settings = settings
        self.template = sft.PromptTemplate(settings.prompt_with_input, settings.prompt_without_input)
        self.records: tuple[ins.Instruction, ...] = ()
        self.tokenizer: Any = None
        self.max_length = 0

    def prepare_node(self, node: NodeData, data: DataSettings, model: ModelSettings) -> Prepared:
        """A deployed node's own instruction file (JSON/JSONL, the run's ``data.format``): all of it trains."""
        return self.prepare(dataclasses.replace(data, name=node.path, max_examples=None), model)

    def prepare(self, data: DataSettings, model: ModelSettings) -> Prepared:
        """Load the instruction records, render their prompts, tokenize with response-only labels."""
        iset = ins.load_instructions(data.name, fmt=data.format, split=data.split,
                                     category_column=data.category_column, max_examples=data.max_examples)
        self.records, self.max_length = iset.records, model.max_length
        self.tokenizer = load_tokenizer(model.name)
        examples, truncated = [], 0
        for record in self.records:
            prompt = self.template.render(record.instruction, record.input)
            ids, labels, cut = sft.encode_example(self.tokenizer, prompt, record.output, model.max_length)
            examples.append((ids, labels))
            truncated += cut
        encoded = sft.SFTEncoded.from_examples(examples, self.tokenizer.pad_token_id)
        names = iset.categories
        if names is None:
            return Prepared(encoded, (0,) * len(self.records), ("all",), False, 0, truncated)
        index = {name: i for i, name in enumerate(names)}
        groups = tuple(index[str(r.category)] for r in self.records)
        return Prepared(encoded, groups, names, True, 0, truncated)

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


TASKS = {"classification": ClassificationTask, "causal_lm": CausalLMTask}


def make_task(settings: TaskSettings) -> ClassificationTask | CausalLMTask:
    """The task object of ``settings.kind``."""
    if settings.kind not in TASKS:
        raise ValueError(f"task.kind={settings.kind!r}: use one of {', '.join(TASKS)}")
    return TASKS[settings.kind](settings)
