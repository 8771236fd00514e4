"""docs/results/hetero_hard/facts.py reruns from a clone and still gives the figures docs/results.md quotes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_hetero_hard_facts_rerun_to_the_quoted_figures() -> None:
    out = subprocess.run([sys.executable, "docs/results/hetero_hard/facts.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 3
    assert "shared_slot_energy mean 0.987; HetLoRA pruned {};" in out[0]  # docs: 95% to 99%, none pruned on seed 0
    assert "'lora_fair': '0.493 (round 17)', 'flexlora': '0.437 (round 17)', 'flora': '0.282 (round 17)'" in out[0]
    assert "mean 0.962; HetLoRA pruned {8: 31, 18: 30, 38: 31};" in out[1]  # three rank-32 clients, 1 or 2 slots
    assert "mean 0.954; HetLoRA pruned {38: 31};" in out[2]
    assert all("mean 25." in line and "min 10" in line for line in out)  # about 25.7 training examples, at least 10


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces as ``-``."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_results_contents_list_every_section_with_its_anchor() -> None:
    text = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    start, end = text.index("<!-- contents -->\n"), text.index("<!-- /contents -->")
    listed = text[start + len("<!-- contents -->\n"):end].splitlines()
    body, expected, fenced = text[end:], [], False
    for line in body.splitlines():
        fenced ^= line.startswith("```")
        match = None if fenced else re.match(r"^(##+) (.*)", line)
        if match:
            title = match.group(2)
            expected.append("  " * (len(match.group(1)) - 2) + f"- [{title}](#{_slug(title)})")
    assert len(expected) > 10
    assert listed == expected, "docs/results.md's contents list must be exactly these lines:\n" + "\n".join(expected)
