"""The ``fedlora`` command's own pieces (the runs themselves are in tests/integration)."""

from __future__ import annotations

from pathlib import Path


def test_resume_points_hydra_at_the_run(tmp_path: Path) -> None:
    from fedlora.cli.main import resume_arguments

    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert resume_arguments([f"resume={tmp_path}"]) == [f"resume={tmp_path}", f"hydra.run.dir={tmp_path}",
                                                         "hydra.output_subdir=null"]
    assert resume_arguments(["resume=/nope"]) == ["resume=/nope"]  # validate() reports it
    assert resume_arguments(["seed=1"]) == ["seed=1"]


def test_every_transport_has_a_runner() -> None:
    from fedlora.cli.main import RUNNERS
    from fedlora.config.settings import TRANSPORTS

    assert set(RUNNERS) == set(TRANSPORTS)


def _finished_run(run_dir: Path, num_rounds: int = 2) -> dict[str, bytes]:
    """A run directory as a finished run leaves it (config, checkpoint of its last round, summary)."""
    import json

    import torch
    import yaml
    from conftest import TINY, compose

    from fedlora.results import checkpoint as ck

    cfg = compose([*TINY, f"num_rounds={num_rounds}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(run_dir)}))
    ck.save_checkpoint(run_dir, ck.Checkpoint(round=num_rounds, adapter={"w": torch.zeros(2)}, strategy_state={},
                                              merges=[], ranks={0: 2, 1: 4, 2: 8},
                                              metrics=[json.dumps({"round": r}) for r in range(num_rounds + 1)]))
    (run_dir / "summary.json").write_text(json.dumps({"final_test_accuracy": 0.5, "primary_metric": "test_accuracy"}))
    (run_dir / "main.log").write_text("the log of the run\n")  # Hydra's job log, which every run has
    return {str(p): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _resume(run_dir: Path):  # noqa: ANN202 - the completed process
    """``fedlora resume=<run_dir>`` exactly as a user types it."""
    import subprocess

    from conftest import FEDLORA, ROOT

    return subprocess.run([FEDLORA, f"resume={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_resuming_a_finished_run_says_so_and_touches_nothing(tmp_path: Path) -> None:
    before = _finished_run(tmp_path / "done")
    out = _resume(tmp_path / "done")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "finished all its 2 rounds; nothing to resume (it is left as it is)" in out.stderr
    after = {str(p): p.read_bytes() for p in sorted((tmp_path / "done").rglob("*")) if p.is_file()}
    assert after == before and "Ray" not in out.stdout + out.stderr


def test_a_refused_resume_writes_nothing_into_the_run_it_refused(tmp_path: Path) -> None:
    before = _finished_run(tmp_path / "done")
    (tmp_path / "done" / "checkpoint" / "LATEST").write_text("round_00042")  # damaged
    before[str(tmp_path / "done" / "checkpoint" / "LATEST")] = b"round_00042"
    out = _resume(tmp_path / "done")
    assert out.returncode == 2 and "names 'round_00042', which holds no meta.json" in out.stderr
    after = {str(p): p.read_bytes() for p in sorted((tmp_path / "done").rglob("*")) if p.is_file()}
    assert after == before and not (tmp_path / "done" / "FAILED").exists()


def test_two_commands_started_together_claim_two_directories(tmp_path: Path) -> None:
    # The run directory goes through Hydra's ${claim:...}: both commands name the same directory; the
    # one that comes second gets "-2". (A bad value stops both right after the directory is made.)
    import subprocess

    from conftest import FEDLORA, ROOT

    target = tmp_path / "same"
    procs = [subprocess.Popen([FEDLORA, "num_clients=0", f"hydra.run.dir=${{claim:{target}}}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        proc.communicate(timeout=180)
        assert proc.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same", "same-2"]
    assert all((tmp_path / name / "FAILED").is_file() for name in ("same", "same-2"))


def test_a_sweeper_optimises_the_validation_metric_when_there_is_one() -> None:
    from fedlora.cli.main import objective

    assert objective({"primary_metric": "test_accuracy", "final_test_accuracy": 0.9}) == 0.9
    assert objective({"primary_metric": "test_accuracy", "final_test_accuracy": 0.9, "final_val_accuracy": 0.8}) == 0.8
    assert objective({"primary_metric": "test_perplexity", "final_test_perplexity": 9.0,
                      "final_val_perplexity": 11.0}) == 11.0
