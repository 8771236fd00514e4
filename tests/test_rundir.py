"""Run directories are claimed atomically: two runs never share one, even when started in the same second."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FEDLORA, ROOT


def test_claim_takes_the_next_free_name_and_remembers_it(tmp_path: Path) -> None:
    from fedlora.cli import rundir

    base = str(tmp_path / "runs" / "2026-12-02_10-00-00_fedavg")
    first = rundir.claim(base)
    assert first == base and Path(first).is_dir()
    assert rundir.claim(base) == first  # Hydra resolves the directory more than once: the same answer
    rundir._claimed.clear()  # as another process would see it
    assert rundir.claim(base) == base + "-2"


def test_two_processes_in_the_same_second_get_two_directories(tmp_path: Path) -> None:
    code = ("import sys; from fedlora.cli import rundir; print(rundir.claim(sys.argv[1]))")
    base = str(tmp_path / "same_second")
    procs = [subprocess.Popen([sys.executable, "-c", code, base], stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(4)]
    claimed = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert claimed == sorted([base, base + "-2", base + "-3", base + "-4"])


def test_printing_the_config_claims_no_directory(tmp_path: Path) -> None:
    # `fedlora --cfg job` resolves the run and sweep directory names but must not create them
    for args in (["--cfg", "job"], ["--cfg", "hydra", "experiment=hetero_hard"], ["--info"]):
        out = subprocess.run([FEDLORA, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir()), args


def test_an_experiment_sweep_leaves_only_its_own_directory(tmp_path: Path) -> None:
    # experiment=privacy sets its own hydra.sweep.dir; OmegaConf's merge over config.yaml's resolves
    # (claims) runs/sweep_<time> once per job composition: each job releases what it does not use.
    out = subprocess.run([FEDLORA, "-m", "experiment=privacy", "seed=0", "strategy=fedavg,ffa_lora",
                          "num_clients=0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "num_clients=0" in out.stderr, out.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(left) == 1 and left[0].startswith("privacy_"), left
    assert (tmp_path / "runs" / left[0] / "0_fedavg_epsinf_seed0" / "FAILED").is_file()


def test_release_keeps_the_used_directory_its_parents_and_anything_written_into(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from fedlora.cli import rundir

    monkeypatch.setattr(rundir, "_claimed", {})  # this process's claims of other tests are not this test's
    with tempfile.TemporaryDirectory() as tmp:
        sweep, stray, written = (rundir.claim(f"{tmp}/{n}") for n in ("sweep", "stray", "written"))
        (Path(written) / "x").write_text("kept")
        job = Path(sweep) / "0_job"
        job.mkdir()
        assert rundir.release_unused(job) == [Path(stray).resolve()]
        assert Path(sweep).is_dir() and Path(written).is_dir() and not Path(stray).exists()
        assert rundir.claim(f"{tmp}/stray") == stray and not Path(stray).exists()  # remembered, not re-created


def test_a_long_job_name_is_cut_with_a_hash_and_a_short_one_is_kept() -> None:
    from fedlora.cli.rundir import NAME_LIMIT, fit_name

    assert fit_name("0_fedavg_seed=1") == "0_fedavg_seed=1"
    long = "0_fedavg_" + ",".join(f"key{i}.value={i}" for i in range(40))
    cut = fit_name(long)
    assert len(cut.encode()) == NAME_LIMIT and cut.startswith(long[:150]) and fit_name(long) == cut
    assert fit_name(long + "x") != cut  # a different tail keeps its own directory
    assert len(fit_name("é" * 300).encode()) <= NAME_LIMIT  # bytes, not characters, and no cut character
