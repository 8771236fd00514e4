"""The probe table of ``bench/probes.py`` covers every config field, and a probe judges a real run."""

from __future__ import annotations

from pathlib import Path

from bench import probes
from fedlora.config.fields import FIELDS


def test_every_field_has_a_probe_and_every_probe_a_unique_name() -> None:
    table = [p for group in probes.GROUPS.values() for p in group()]
    names = [f"{p.group}/{p.name}" for p in table]
    assert len(names) == len(set(names))
    config = {p.name.split("=")[0] for p in table if p.group == "config"}
    assert {f.path for f in FIELDS} <= config


def test_a_probe_runs_the_real_command_and_judges_it(tmp_path: Path) -> None:
    bad = probes.Probe("config", "num_rounds=true", lambda _: ["num_rounds=true"], expect=("num_rounds=",))
    outcome = probes.run_probe(bad, tmp_path)
    assert outcome.handled_well, outcome.output_tail
    assert outcome.status == 2 and "num_rounds=True: must be a positive integer" in outcome.output_tail
    # the same run judged against a wrong expectation is not handled well, and says why
    wrong = probes.Probe("config", "x", bad.args, expect=("no such text",), status=0)
    why = probes.judge(wrong, outcome.status, outcome.output_tail, outcome.seconds, tmp_path)
    assert why == "exit status 2, expected 0"
