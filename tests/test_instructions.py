"""Instruction data: the synthetic set, Alpaca and Dolly files, layout detection, split and partition."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedlora.runtime.data.datasets import DataError
from fedlora.runtime.data.instructions import (
    Instruction,
    detect_format,
    instruction_columns,
    load_instructions,
    synthetic_instructions,
)

ALPACA = [
    {"instruction": "Give a synonym.", "input": "happy", "output": "glad"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
    {"instruction": "Add.", "input": "2 + 3", "output": "5"},
]
DOLLY = [
    {"instruction": "Who wrote it?", "context": "Hamlet is a play by Shakespeare.", "response": "Shakespeare",
     "category": "closed_qa"},
    {"instruction": "Suggest a name for a cat.", "context": "", "response": "Miso",
     "category": "brainstorming"},
    {"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
     "category": "summarization"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_synthetic_set_is_deterministic_and_correct() -> None:
    records = synthetic_instructions(500, seed=0)
    assert records == synthetic_instructions(500, seed=0) and records != synthetic_instructions(500, seed=1)
    kinds = ("uppercase", "reverse", "arithmetic", "copy", "spelling")
    assert Counter(r.category for r in records) == {c: 100 for c in kinds}
    for r in records:
        if r.category == "uppercase":
            assert r.output == r.input.upper()
        elif r.category == "reverse":
            assert r.output.split() == r.input.split()[::-1]
        elif r.category == "arithmetic":
            a, b = r.input.split(" + ")
            assert int(r.output) == int(a) + int(b)
        elif r.category == "copy":
            assert r.output == r.input
        else:
            assert r.input == "" and r.output  # the one kind without input
    assert load_instructions("synthetic_instructions", max_examples=50).records == records[:50]


def test_alpaca_json_array_and_jsonl(tmp_path: Path) -> None:
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(ALPACA))
    lines = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    for path in (array, lines):
        data = load_instructions(str(path))
        assert data.layout == "alpaca" and data.categories is None
        assert data.records[0] == Instruction("Give a synonym.", "happy", "glad", None)
        assert data.records[1].input == ""
    assert instruction_columns(str(array)) == ["instruction", "input", "output"]


def test_dolly_jsonl_with_categories(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY)
    data = load_instructions(str(path))
    assert data.layout == "dolly"
    assert data.records[0] == Instruction("Who wrote it?", "Hamlet is a play by Shakespeare.", "Shakespeare",
                                          "closed_qa")
    assert data.categories == ("brainstorming", "closed_qa", "summarization")
    assert load_instructions(str(path), category_column=None).categories is None


def test_missing_optional_fields_are_empty(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hi"},
                                              {"instruction": "x", "input": None, "output": "y"}])
    assert [r.input for r in load_instructions(str(path)).records] == ["", ""]


def test_layout_detection_and_errors() -> None:
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["instruction", "context", "response", "category"]) == "dolly"
    assert detect_format(["instruction", "response"], "dolly") == "dolly"
    with pytest.raises(DataError, match=r"\['text', 'label'\] fit no instruction layout"):
        detect_format(["text", "label"])
    with pytest.raises(DataError, match="instruction\\+response \\(dolly\\)"):
        detect_format(["instruction", "input", "output"], "dolly")
    with pytest.raises(DataError, match="data.format='xml'"):
        detect_format(["instruction", "output"], "xml")


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        load_instructions(str(path))


def test_workspace_splits_by_category_and_partitions_dolly_by_it(tmp_path: Path) -> None:
    from conftest import compose

    from fedlora.config.settings import Settings
    from fedlora.runtime.training.workspace import Workspace

    rows = [dict(DOLLY[k % 3], instruction=f"q{k}") for k in range(60)]
    path = write_jsonl(tmp_path / "dolly.jsonl", rows)
    cfg = compose(["task=causal_lm", "data=instructions_file", f"data.name={path}", "num_clients=3",
                   "partition.alpha=0.1", "partition.min_partition_size=2"])
    ws = Workspace(Settings.from_config(cfg).workspace_key())
    assert ws.label_names == ("brainstorming", "closed_qa", "summarization")
    assert len(ws.test) == 12 and Counter(k % 3 for k in ws.test) == {0: 4, 1: 4, 2: 4}  # stratified
    assert sorted(i for p in ws.partitions for i in p) == ws.train
    assert ws.num_labels == 0 and ws.host.spec(2).head == {}
    # alpha 0.1: clients are dominated by one or two categories
    assert max(max(Counter(k % 3 for k in p).values()) / len(p) for p in ws.partitions) > 0.6
    prompts = ws.generation_prompts  # fixed held-out prompts, the categories taken in turn
    assert len(prompts) == 4 and all(p.index in ws.test for p in prompts)
    assert [p.category for p in prompts] == ["brainstorming", "closed_qa", "summarization", "brainstorming"]
