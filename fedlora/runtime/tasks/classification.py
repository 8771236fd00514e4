"""Sequence classification: a text/label corpus, a classifier head; judged by test accuracy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedlora.core.env import hub_offline
from fedlora.core.errors import Problems
from fedlora.core.metrics import ACCURACY
from fedlora.runtime.data import datasets as ds
from fedlora.runtime.data.settings import DataSettings, NodeData
from fedlora.runtime.models import ModelSettings, load_tokenizer
from fedlora.runtime.tasks.base import AddProblem, Prepared, Task
from fedlora.runtime.tiny_decoder import TINY_NAME
from fedlora.runtime.training.local import Encoded, TokenizedOnDemand, evaluate

INSTRUCTION_DATA = "synthetic_instructions"  # the built-in instruction set (for task=causal_lm)


class ClassificationTask(Task):
    """Sequence classification: accuracy and cross-entropy on the held-out articles."""

    kind = "classification"
    metric = ACCURACY
    decoder = False
    builtin_model = "all-MiniLM-L6-v2"

    # -- configuration checks ---------------------------------------------------------------------
    @classmethod
    def check_model(cls, name: Any, p: Problems) -> bool:
        """The built-in tiny decoder serves causal-LM fine-tuning only."""
        if name == TINY_NAME:
            p.add("model.name", name, "the tiny random decoder is for task=causal_lm; for classification use "
                  "model=minilm or model=hf")
            return False
        return True

    @classmethod
    def check_data(cls, cfg: Mapping[str, Any], p: Problems) -> None:
        """``bbc_news``, a local file with the configured text and label columns, or a hub name (online)."""
        data = cfg.get("data", {})
        name = data.get("name")
        if name == ds.BUILTIN_BBC:
            return
        if name == INSTRUCTION_DATA:
            p.add("data.name", name, "instruction data is for task=causal_lm (fedlora task=causal_lm); "
                  "classification needs text and labels, for example data=bbc_news")
            return
        if not isinstance(name, str) or not name:
            p.add("data.name", name, "use bbc_news, a local csv/json/jsonl/parquet file, or a hub dataset name")
            return
        if ds.is_local_file(name):
            if not Path(name).is_file():
                p.add("data.name", name, "the file does not exist; give an existing path (absolute, or relative "
                      "to where you run fedlora)")
                return
            try:
                columns = ds.read_columns(name)
            except ds.DataError as exc:
                p.add("data.name", name, str(exc))
                return
            for field in ("text_column", "label_column"):
                if data.get(field) not in columns:
                    p.add(f"data.{field}", data.get(field), f"not a column of {name}; its columns are {columns}")
            return
        if hub_offline():
            p.add("data.name", name, "unknown dataset: not bbc_news nor a local file, and hub access is off "
                  "(HF_HUB_OFFLINE=1); give a local file or set offline=false")

    @classmethod
    def check_node_file(cls, path: str, data: Mapping[str, Any], key: str, add: AddProblem) -> None:
        """A csv/json/jsonl/parquet file with the run's text and label columns."""
        suffixes = tuple(ds.LOCAL_SUFFIXES)
        if Path(path).suffix.lower() not in suffixes:
            add(key, path, f"use a {'/'.join(s[1:] for s in suffixes)} file")
        elif not Path(path).is_file():
            add(key, path, "no such file on this node; give an absolute path to an existing file")
        else:
            try:
                columns = ds.read_columns(path)
            except ds.DataError as exc:
                add(key, path, str(exc))
                return
            missing = [c for c in (data.get("text_column"), data.get("label_column")) if c not in columns]
            if missing:
                add(key, path, f"has no column(s) {missing} (its columns are {columns}); the run reads "
                    "data.text_column / data.label_column: rename the file's columns or deploy with other names")

    # -- data and evaluation -------------------------------------------------------------------------
    @staticmethod
    def _corpus(data: DataSettings) -> ds.Corpus:
        return ds.load_corpus(data.name, text_column=data.text_column, label_column=data.label_column,
                              split=data.split, max_examples=data.max_examples, drop_incomplete=data.drop_incomplete)

    def groups(self, data: DataSettings) -> tuple[tuple[int, ...], bool]:
        """The class of each example."""
        return self._corpus(data).labels, True

    def prepare(self, data: DataSettings, model: ModelSettings) -> Prepared:
        """Load the corpus and tokenize it to ``model.max_length`` (padded, truncated)."""
        return self._tokenized(self._corpus(data), model)

    def prepare_node(self, node: NodeData, data: DataSettings, model: ModelSettings) -> Prepared:
        """A deployed node's own file, its labels numbered by the run's label names (not the file's)."""
        corpus = ds.load_local(node.path, node.text_column, node.label_column, node.label_names,
                               drop_incomplete=data.drop_incomplete)
        return self._tokenized(corpus, model)

    @staticmethod
    def _tokenized(corpus: ds.Corpus, model: ModelSettings) -> Prepared:
        # each row tokenized when a batch first reads it: a process reads only its share of the corpus
        encoded = TokenizedOnDemand(corpus.texts, corpus.labels, load_tokenizer(model.name), model.max_length)
        return Prepared(encoded, corpus.labels, corpus.label_names, True, corpus.num_labels)

    def evaluate(self, model: torch.nn.Module, data: Encoded | TokenizedOnDemand, indices: list[int], batch_size: int,
                 ) -> dict[str, float]:
        """``test_loss`` and ``test_accuracy`` on ``indices``."""
        loss, acc = evaluate(model, data, indices, batch_size)
        return {"test_accuracy": acc, "test_loss": loss}
