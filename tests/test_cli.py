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
