"""Generations of a causal LM: greedy completions of fixed held-out prompts after every round.

``generations.jsonl`` keeps one record per prompt and round; ``generations.md`` shows them per
prompt, round by round, for reading.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

GENERATIONS = "generations.jsonl"
GENERATIONS_MD = "generations.md"


def log_generations(run_dir: Path, server_round: int, rows: Sequence[Mapping[str, Any]]) -> None:
    """Append one round's generations to ``generations.jsonl`` and rewrite ``generations.md``."""
    path = Path(run_dir) / GENERATIONS
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"round": server_round, **row}, sort_keys=True) + "\n")
    _write_generations_md(Path(run_dir))


def truncate_generations(run_dir: Path, last_round: int) -> None:
    """Keep the generations of rounds ``<= last_round`` (a resumed run redoes the later ones)."""
    path = Path(run_dir) / GENERATIONS
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(x + "\n" for x in rows if json.loads(x)["round"] <= last_round))
    _write_generations_md(Path(run_dir))


def read_generations(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``generations.jsonl`` (round, example, category, prompt, reference, output)."""
    path = Path(run_dir) / GENERATIONS
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def _cell(text: str) -> str:
    """Text inside a Markdown table cell: pipes escaped, line breaks and control bytes made visible."""
    if not text.strip():
        return "*(empty)*"
    text = "".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text)
    return text.replace("|", "\\|").replace("\n", "<br>")


def _write_generations_md(run_dir: Path) -> None:
    """One section per held-out prompt: the prompt, the reference, and the output of every round."""
    by_example: dict[int, list[dict[str, Any]]] = {}
    for row in read_generations(run_dir):
        by_example.setdefault(int(row["example"]), []).append(row)
    parts = ["# Generations", "", "Greedy completions of fixed held-out prompts by the global model after "
             "each round (round 0: before training). Written by fedlora; the data are in "
             "generations.jsonl.", ""]
    for example, rows in by_example.items():
        first = rows[0]
        category = f" ({first['category']})" if first.get("category") else ""
        parts += [f"## Example {example}{category}", "", "```", first["prompt"].rstrip("\n"), "```", "",
                  f"Reference: {_cell(first['reference'])}", "", "| round | output |", "|---|---|"]
        parts += [f"| {r['round']} | {_cell(r['output'])} |" for r in sorted(rows, key=lambda r: r["round"])]
        parts.append("")
    (run_dir / GENERATIONS_MD).write_text("\n".join(parts))
