"""Data files that are not what they should be are refused before anything starts, naming the file and the fix.

Each malformed kind is written to a temporary file and the whole validation runs on a config that
points at it: an error naming the file (and the rows or records), never a traceback later, never a
silent surprise (a sixth class called "nan", ten classes out of mixed labels, empty responses).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose

from fedlora.config.validate import validate
from fedlora.core.errors import ConfigError
from fedlora.runtime.data import datasets as ds

TABLE = ["data=local_file", "num_clients=2", "partition=iid", "data.test_fraction=0.25"]
INSTRUCTIONS = ["task=causal_lm", "data=instructions_file", "num_clients=2", "partition=iid"]


def rows(n: int, label: object = "sports") -> list[dict]:
    return [{"text": f"article {i}", "label": label} for i in range(n)]


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def refused(overrides: list[str], *expected: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides), check_model=False)
    text = str(info.value)
    for piece in expected:
        assert piece in text, text
    return text


@pytest.mark.parametrize("name,content,expected", [
    ("empty.csv", "", "is empty"),
    ("header.csv", "text,label\n", "has a header but no rows"),
    ("latin1.csv", "text,label\nCaf\xe9 news,sports\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
    ("object.json", json.dumps({"text": "a", "label": "b"}), "holds a JSON object, not a list of records"),
    ("empty.jsonl", "\n", "is empty"),
])
def test_unreadable_tables(tmp_path: Path, name: str, content: str | bytes, expected: str) -> None:
    path = write(tmp_path / name, content)
    refused([*TABLE, f"data.name={path}"], str(path), expected)


def test_too_few_rows_for_the_clients(tmp_path: Path) -> None:
    path = write(tmp_path / "one.csv", "text,label\nonly one,sports\n")
    refused([*TABLE, f"data.name={path}"], "num_clients=2: the training split", "holds only 1 examples")


def test_missing_labels_and_texts_name_the_rows(tmp_path: Path) -> None:
    table = "text,label\n" + "".join(f"a{i},sports\n" for i in range(8)) + "no label,\n,tech\n"
    path = write(tmp_path / "gaps.csv", table)
    refused([*TABLE, f"data.name={path}"], "row(s) 9, 10 have no text or no label", "data.drop_incomplete=true")
    validate(compose([*TABLE, f"data.name={path}", "data.drop_incomplete=true"]), check_model=False)
    corpus = ds.load_local(str(path), "text", "label", drop_incomplete=True)
    assert len(corpus.texts) == 8 and corpus.label_names == ("sports",)  # no class called "nan"


def test_labels_that_mix_numbers_and_text(tmp_path: Path) -> None:
    path = write(tmp_path / "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in rows(6) + rows(6, label=3)))
    refused([*TABLE, f"data.name={path}"], "the labels mix numbers (e.g. 3) and text (e.g. 'sports')")


def test_number_labels_with_a_gap_stay_integers(tmp_path: Path) -> None:
    # a number column with an empty cell is read as floats: dropping the row must leave labels 0 and 1
    path = write(tmp_path / "ints.csv", "text,label\n" + "".join(f"a{i},{i % 2}\n" for i in range(8)) + "x,\n")
    corpus = ds.load_local(str(path), "text", "label", drop_incomplete=True)
    assert corpus.label_names == ("0", "1")


@pytest.mark.parametrize("records,expected", [
    ([{"instruction": "a", "input": "", "output": None}], "record(s) 1 have no 'instruction' or no 'output'"),
    ([{"instruction": "a", "input": ""}], "record(s) 1 have no 'instruction' or no 'output'"),
    ([{"instruction": " ", "input": "", "output": "b"}], "record(s) 1 have no 'instruction' or no 'output'"),
])
def test_instruction_records_without_a_response(tmp_path: Path, records: list, expected: str) -> None:
    good = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    path = write(tmp_path / "alpaca.jsonl", "".join(json.dumps(r) + "\n" for r in records + good))
    refused([*INSTRUCTIONS, f"data.name={path}"], str(path), expected, "data.drop_incomplete=true")
    validate(compose([*INSTRUCTIONS, f"data.name={path}", "data.drop_incomplete=true"]), check_model=False)


@pytest.mark.parametrize("name,content,expected", [
    ("object.json", json.dumps({"instruction": "a", "output": "b"}), "holds one JSON object, not a list of records"),
    ("empty.jsonl", "", "is empty"),
    ("latin1.jsonl", '{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"), "is not UTF-8 text"),
    ("items.json", json.dumps([{"instruction": "a", "output": "b"}, "oops"]), "item(s) 2 of the array are not"),
])
def test_unreadable_instruction_files(tmp_path: Path, name: str, content: str | bytes, expected: str) -> None:
    path = write(tmp_path / name, content)
    refused([*INSTRUCTIONS, f"data.name={path}"], expected)
