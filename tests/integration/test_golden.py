"""Behaviour pinned: tiny runs of the seed strategies (FedAvg, FLoRA, FFA-LoRA, LoRA-FAIR, the centralized
bound; FedAvg and FLoRA with ComPEFT) write the metrics recorded in tests/golden/.

Five of the seven cases are exactly the runs of end-to-end tests in ``test_e2e.py`` (which add TensorBoard
logging, and nothing it writes enters ``metrics.jsonl`` or the adapter): those tests check their own run
against the golden file with :func:`check_golden`, which first checks that the run's command line is the
case's, so the same tiny run is not paid for twice. This module runs the other two.

The golden files were recorded with ``tests/golden/record.py`` (3 clients with ranks 2/4/8, 2 rounds
of 2 local steps, the real MiniLM through real Flower apps on real Ray) from main before the glue
was rebuilt, so a refactoring that changes what a run computes fails here. On a machine of the
kind they were recorded on (same torch build, CPU capability and kernel-relevant CPU flags: the same
torch gives other last bits with AMX than without) every value must be equal, digit for digit, and
the saved adapter byte for byte; elsewhere floating-point kernels differ in their last bits, so
numbers are compared to 1e-5 relative (1e-6 absolute) and everything else exactly. The files were
re-recorded on 2026-12-04 on a CPU with AMX, each checked to that tolerance against the earlier one.

One change is intended, and checked field by field: the centralized bound now runs through the same
round loop as a federation (a pooled transport with one learner), so its training rounds list that
learner like a client (status ok, the pooled examples, nothing communicated), count
``num_rejected`` and carry FedAvg's ``product_gap_rel`` of its single update (0). Every accuracy,
loss and byte count, and the saved adapter, are unchanged.

A second is an addition: every training round whose adapter changed records the rank-collapse
diagnostic (``slot_energy``, one share per rank slot of the global adapter, summing to 1, and
``shared_slot_energy``, the share in the first ``r_min`` slots); it is checked and then set aside, so
the recorded numbers are compared as they were.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))

import yaml  # noqa: E402
from record import ARGS, CASES, HERE, machine, record_of, run_case  # noqa: E402

pytestmark = pytest.mark.slow


def approx_equal(got: object, want: object, where: str = "", *, compressed: bool = False) -> list[str]:
    """Where ``got`` differs from ``want``: exactly for structure, ints and strings, to 1e-5 relative for floats
    (or 1e-6 absolute: a quantity that is zero but for rounding, FFA-LoRA's ``product_gap_rel`` of about
    5e-8, differs in its leading digits between CPUs).

    ``compressed``: a ComPEFT run, where a last-bit difference can move a kept entry or a sign, so the
    code's length (a byte count) may differ by a few bytes and what follows from it by more than the
    last bits: floats to 1e-3 relative, byte counts to 1%.
    """
    rel = 1e-3 if compressed else 1e-5
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return [f"{where}: keys {sorted(set(got) ^ set(want))} differ"]
        return [d for k in want for d in approx_equal(got[k], want[k], f"{where}.{k}", compressed=compressed)]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items, expected {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True))
                for d in approx_equal(g, w, f"{where}[{i}]", compressed=compressed)]
    if isinstance(want, float) and isinstance(got, float):
        same = got == want or (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=rel,
                                                                                     abs_tol=1e-6)
        return [] if same else [f"{where}: {got!r} != {want!r}"]
    if compressed and where.rpartition(".")[2].startswith("bytes") and isinstance(want, int) and isinstance(got, int):
        return [] if math.isclose(got, want, rel_tol=1e-2) else [f"{where}: {got!r} != {want!r}"]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def without_pooled_learner(rows: list[dict]) -> list[dict]:
    """The centralized run's records as they were before the loop served it: check, then drop, the additions."""
    out = []
    for row in rows:
        row = dict(row)
        if row["round"] >= 1:
            (learner,) = row.pop("clients")
            assert learner == {"client": 0, "rank": 8, "status": "ok", "num_examples": 1781, "bytes_down": 0,
                               "bytes_up": 0, "base_version": 0, "train_loss": row["train_loss"]}, learner
            assert row.pop("num_rejected") == 0 and row.pop("strategy") == {"product_gap_rel": 0.0}
            row.update(clients=[], strategy={})
        out.append(row)
    return out


def without_slot_energy(rows: list[dict], case: str) -> list[dict]:
    """The records without the rank-slot diagnostic, after checking it is there and well-formed."""
    out = []
    for row in rows:
        row = dict(row)
        shares, shared = row.pop("slot_energy", None), row.pop("shared_slot_energy", None)
        if row["round"] == 0 or case.startswith("flora"):  # nothing trained / FLoRA's update is its merge
            assert shares is None and shared is None, (case, row["round"])
        else:
            assert len(shares) == 8 and math.isclose(sum(shares), 1.0, rel_tol=1e-9), (case, shares)
            r_min = min(c["rank"] for c in row["clients"] if c["status"] == "ok")
            assert math.isclose(shared, sum(shares[:r_min]), rel_tol=1e-12), (case, shared)
        out.append(row)
    return out


#: The cases whose run a test of test_e2e.py makes, with the test that checks it.
CHECKED_IN_E2E = {"fedavg": "test_fedavg_end_to_end",
                  "ffa_lora": "test_ffa_lora_end_to_end_a_never_travels_or_changes",
                  "lora_fair": "test_lora_fair_end_to_end_never_worse_than_fedavg",
                  "centralized": "test_centralized_upper_bound",
                  "flora_compeft": "test_compeft_composes_and_cuts_the_uplink"}
#: Overrides that change what a run logs, never what it computes.
_LOGGING_ONLY = ("logging.tensorboard=",)


def check_golden(case: str, run_dir: Path) -> None:
    """Check a finished run of ``case`` (made by another test) against its golden file.

    The run's own command-line overrides (``.hydra/overrides.yaml``) must be the case's, logging switches
    aside, so that a change to the other test's arguments cannot make this check compare different runs.
    """
    given = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    case_args = [*ARGS, *CASES[case]]
    assert [a for a in given if not a.startswith(_LOGGING_ONLY)] == [
        a for a in case_args if not a.startswith(_LOGGING_ONLY)], (given, case_args)
    _compare(case, record_of(case, run_dir))


def _compare(case: str, got: dict) -> None:
    golden = json.loads((HERE / f"{case}.json").read_text())
    got["metrics"] = without_slot_energy(got["metrics"], case)
    if case == "centralized":
        got["metrics"] = without_pooled_learner(got["metrics"])
    if golden["machine"] == machine():
        assert got["metrics"] == golden["metrics"]
        assert got["adapter_sha256"] == golden["adapter_sha256"]
    else:
        assert approx_equal(got["metrics"], golden["metrics"], compressed="compeft" in case) == []


@pytest.mark.parametrize("case", sorted(set(CASES) - set(CHECKED_IN_E2E)))
def test_run_writes_the_golden_metrics(case: str, tmp_path: Path) -> None:
    _compare(case, run_case(case, tmp_path / "run"))


def test_every_case_is_checked_by_a_run() -> None:
    """The cases left to test_e2e.py are checked there: each named test calls check_golden with its case."""
    source = (Path(__file__).parent / "test_e2e.py").read_text()
    for case, test in CHECKED_IN_E2E.items():
        body = source.split(f"def {test}(", 1)[1].split("\ndef ", 1)[0]
        assert f'check_golden("{case}", run_dir)' in body, (case, test)
