"""Instruction data for causal-LM supervised fine-tuning: Alpaca and Dolly layouts, a synthetic set.

Two public layouts are read, both reduced to one :class:`Instruction` (instruction, input, output,
category):

- **Alpaca**: ``instruction``, ``input`` (may be empty), ``output``;
- **Dolly**: ``instruction``, ``context`` (may be empty), ``response``, ``category``.

Sources: the built-in ``synthetic_instructions`` (generated here, deterministically, so tests and
the offline demo need no download), a local ``.json`` (an array or JSON lines) / ``.jsonl`` file,
or a hub dataset name (only with ``offline=false``). The layout is detected from the columns or
set explicitly (``data.format``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.runtime.data.datasets import DataError, is_local_file, numbered, read_text_file

BUILTIN_SYNTHETIC = "synthetic_instructions"
FORMATS = ("auto", "alpaca", "dolly")
#: Local instruction files: a JSON array of records, or JSON lines.
INSTRUCTION_SUFFIXES = (".json", ".jsonl")
#: Column names of each layout: (instruction, input, output); the input column is optional.
LAYOUTS: dict[str, tuple[str, str, str]] = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
}
SYNTHETIC_COLUMNS = ["instruction", "input", "output", "category"]
DEFAULT_SYNTHETIC_SIZE = 2000


@dataclass(frozen=True)
class Instruction:
    """One supervised example: the prompt's parts, the target response and an optional category."""

    instruction: str
    input: str
    output: str
    category: str | None = None


@dataclass(frozen=True)
class InstructionSet:
    """Instruction records and the layout they were read from."""

    records: tuple[Instruction, ...]
    layout: str

    @property
    def categories(self) -> tuple[str, ...] | None:
        """Sorted distinct categories, or ``None`` when the records have none."""
        if any(r.category is None for r in self.records):
            return None
        return tuple(sorted({str(r.category) for r in self.records}))


def detect_format(columns: Sequence[str], requested: str = "auto") -> str:
    """Return the layout (``alpaca`` or ``dolly``) of data with ``columns``.

    Raises
    ------
    DataError
        If ``requested`` is not one of :data:`FORMATS`, or the columns fit no (or not the requested)
        layout; the message names the columns that are there and those that are needed.
    """
    if requested not in FORMATS:
        raise DataError(f"data.format={requested!r}: use one of {', '.join(FORMATS)}")
    candidates = list(LAYOUTS) if requested == "auto" else [requested]
    for layout in candidates:
        instruction, _, output = LAYOUTS[layout]
        if instruction in columns and output in columns:
            return layout
    needed = " or ".join(f"{LAYOUTS[k][0]}+{LAYOUTS[k][2]} ({k})" for k in candidates)
    raise DataError(f"the columns {list(columns)} fit no instruction layout: need {needed}; Alpaca records "
                    "have instruction/input/output, Dolly records instruction/context/response")


def instruction_columns(name: str) -> list[str]:
    """Return the column names of the instruction data named ``name`` (built-in or local file)."""
    if name == BUILTIN_SYNTHETIC:
        return list(SYNTHETIC_COLUMNS)
    return _columns(_read_local(Path(name)))


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every key that some record has, in order of first appearance (a record may lack one)."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _read_local(path: Path) -> list[dict[str, Any]]:
    """Read a JSON array, or JSON lines (``.jsonl``, or a ``.json`` that is not one array).

    Raises
    ------
    DataError
        Naming the file (and line) and the fix: not UTF-8, empty, a JSON object instead of a list
        of records, a line or an array item that is not a record.
    """
    where = f"data.name={str(path)!r}"
    text = read_text_file(path, where, "give a JSON array of records or one record per line")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON lines with a .json name
        if isinstance(data, dict):
            raise DataError(f"{where} holds one JSON object, not a list of records; write an array of records "
                            '([{"instruction": ..., "output": ...}, ...]) or one record per line in a .jsonl file')
        if isinstance(data, list):
            bad = [i + 1 for i, row in enumerate(data) if not isinstance(row, dict)]
            if bad:
                raise DataError(f"{where}: item(s) {numbered(bad)} of the array are not records (JSON objects)")
            return [dict(row) for row in data]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(dict(json.loads(line)))
            except (json.JSONDecodeError, TypeError, ValueError) as exc:
                raise DataError(f"{where} line {number} is not a JSON object ({exc})") from None
    return rows


def _text(value: Any) -> str:
    """A field as text: missing, ``None`` and NaN become ``""``."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def records_from_rows(rows: Sequence[Mapping[str, Any]], layout: str, category_column: str | None,
                      *, name: str = "the data", drop_incomplete: bool = False) -> tuple[Instruction, ...]:
    """Turn table rows of ``layout`` into :class:`Instruction` records (categories when present).

    A record without an instruction or a response (missing, null or blank) would train on nothing:
    an error naming the records (numbered from 1), or, with ``drop_incomplete``, dropped and counted.
    """
    instruction, input_col, output = LAYOUTS[layout]
    bad = [i + 1 for i, row in enumerate(rows) if not _text(row.get(instruction)).strip()
           or not _text(row.get(output)).strip()]
    if bad and not drop_incomplete:
        raise DataError(f"{name}: record(s) {numbered(bad)} have no {instruction!r} or no {output!r}; fill or "
                        "remove them, or set data.drop_incomplete=true to train without them")
    if bad:
        print(f"[fedlora] {name}: {len(bad)} record(s) without an instruction or a response dropped "
              "(data.drop_incomplete=true)", flush=True)
        skip = set(bad)
        rows = [row for i, row in enumerate(rows) if i + 1 not in skip]
    if not rows:
        raise DataError(f"{name}: no record has both an instruction and a response")
    use_category = bool(category_column) and all(category_column in row for row in rows)
    return tuple(
        Instruction(_text(row.get(instruction)), _text(row.get(input_col)), _text(row.get(output)),
                    _text(row.get(category_column)) if use_category else None)
        for row in rows
    )


def load_instructions(name: str, *, fmt: str = "auto", split: str = "train",
                      category_column: str | None = "category", max_examples: int | None = None,
                      seed: int = 0, drop_incomplete: bool = False) -> InstructionSet:
    """Load the instruction data named by ``data.name``.

    ``synthetic_instructions`` generates ``max_examples`` (default 2,000) records from ``seed``;
    for files and hub datasets ``max_examples`` keeps a seeded random subset (in file order).
    """
    if name == BUILTIN_SYNTHETIC:
        return InstructionSet(synthetic_instructions(max_examples or DEFAULT_SYNTHETIC_SIZE, seed), "alpaca")
    if is_local_file(name):
        rows = _read_local(Path(name))
    else:
        import datasets  # noqa: PLC0415 - only for hub names (needs offline=false or the cache)

        rows = list(datasets.load_dataset(name, split=split))
    if not rows:
        raise DataError(f"data.name={name!r} holds no records")
    layout = detect_format(_columns(rows), fmt)
    if max_examples is not None and max_examples < len(rows):
        keep = sorted(random.Random(0).sample(range(len(rows)), max_examples))
        rows = [rows[i] for i in keep]
    return InstructionSet(records_from_rows(rows, layout, category_column, name=f"data.name={name!r}",
                                            drop_incomplete=drop_incomplete), layout)


# -- the synthetic instruction set -------------------------------------------------------------------

_WORDS = ("red", "blue", "green", "cat", "dog", "fish", "sun", "moon", "tree", "rock", "bird", "star",
          "milk", "bread", "apple", "lemon", "river", "cloud", "stone", "wind")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                 "nineteen", "twenty")


def _phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))


def _uppercase(rng: random.Random) -> Instruction:
    text = _phrase(rng)
    return Instruction("Write the text in capital letters.", text, text.upper(), "uppercase")


def _reverse(rng: random.Random) -> Instruction:
    text = _phrase(rng)
    return Instruction("Reverse the order of the words.", text, " ".join(reversed(text.split())), "reverse")


def _add(rng: random.Random) -> Instruction:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return Instruction("Add the two numbers.", f"{a} + {b}", str(a + b), "arithmetic")


def _repeat(rng: random.Random) -> Instruction:
    text = _phrase(rng)
    return Instruction("Repeat the text.", text, text, "copy")


def _spell(rng: random.Random) -> Instruction:
    n = rng.randint(0, len(_NUMBER_WORDS) - 1)
    return Instruction(f"Write the number {n} in words.", "", _NUMBER_WORDS[n], "spelling")


_MAKERS = (_uppercase, _reverse, _add, _repeat, _spell)


def synthetic_instructions(n: int, seed: int = 0) -> tuple[Instruction, ...]:
    """Return ``n`` instruction records of five categories, the same for a given ``seed`` everywhere.

    Categories: ``uppercase``, ``reverse`` (word order), ``arithmetic`` (two-number sums), ``copy``
    and ``spelling`` (a number in words; the one kind without an input). Each answer is a function
    of the prompt, so a model can learn them, and the held-out loss shows it.
    """
    rng = random.Random(seed)
    return tuple(_MAKERS[i % len(_MAKERS)](rng) for i in range(n))
