"""Checkpoints and client-state files: exact round trips, atomic visibility, pruning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.results import checkpoint as ck


def _ckpt(round_: int, merges: int) -> ck.Checkpoint:
    g = torch.Generator().manual_seed(round_)
    return ck.Checkpoint(
        round=round_,
        adapter={"m.lora_A.weight": torch.randn(3, 4, generator=g), "m.lora_B.weight": torch.randn(5, 3, generator=g)},
        strategy_state={"seed": torch.tensor(7, dtype=torch.int64)},
        merges=[{"m": (torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g))} for _ in range(merges)],
        ranks={0: 2, 1: 4}, acked={0: 1}, best=0.5, elapsed=12.5,
        metrics=[json.dumps({"round": r}) for r in range(round_ + 1)],
    )


def test_round_trip_is_exact(tmp_path: Path) -> None:
    saved = _ckpt(3, merges=2)
    ck.save_checkpoint(tmp_path, saved)
    got = ck.load_checkpoint(tmp_path)
    assert got.round == 3 and got.ranks == {0: 2, 1: 4} and got.acked == {0: 1}
    assert got.best == 0.5 and got.elapsed == 12.5 and got.metrics == saved.metrics
    for k, t in saved.adapter.items():
        assert torch.equal(got.adapter[k], t)
    assert torch.equal(got.strategy_state["seed"], saved.strategy_state["seed"])
    assert got.strategy_state["seed"].dtype == torch.int64
    assert len(got.merges) == 2
    for a, b in zip(got.merges, saved.merges, strict=True):
        assert torch.equal(a["m"][0], b["m"][0]) and torch.equal(a["m"][1], b["m"][1])


def test_random_number_states_are_restored(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.save_checkpoint(tmp_path, _ckpt(1, merges=0))
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    got = ck.load_checkpoint(tmp_path)
    ck.restore_rng(got.rng, got.rng["torch"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_latest_moves_only_when_a_round_is_complete(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    ck.save_checkpoint(tmp_path, _ckpt(1, merges=1))
    root = tmp_path / ck.CHECKPOINT_DIR
    # a kill while writing round 2 leaves a temporary directory: invisible to readers
    (root / ".round_00002.tmp-123").mkdir()
    (root / ".round_00002.tmp-123" / "meta.json").write_text("{garbage")
    assert ck.load_checkpoint(tmp_path).round == 1

    # a kill after round 2's directory appeared but before LATEST moved: readers still get round 1
    write_atomic = ck.write_atomic

    def killed(path: Path, data: bytes) -> None:  # the kill lands just before LATEST moves
        if path.name == "LATEST":
            raise KeyboardInterrupt("killed")
        write_atomic(path, data)

    with monkeypatch.context() as m:
        m.setattr(ck, "write_atomic", killed)
        try:
            ck.save_checkpoint(tmp_path, _ckpt(2, merges=2), merges_from=1)
        except KeyboardInterrupt:
            pass
    assert (root / "round_00002").is_dir() and ck.load_checkpoint(tmp_path).round == 1
    # the resumed run writes round 2 again
    ck.save_checkpoint(tmp_path, _ckpt(2, merges=2), merges_from=1)
    assert ck.load_checkpoint(tmp_path).round == 2
    assert sorted(p.name for p in root.glob("round_*")) == ["round_00002"]  # older rounds pruned
    assert not ck.has_checkpoint(tmp_path / "elsewhere")


def test_merges_are_written_once(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, _ckpt(1, merges=1))
    first = tmp_path / ck.CHECKPOINT_DIR / "merges" / "merge_00000.safetensors"
    stamp = first.stat().st_mtime_ns
    ck.save_checkpoint(tmp_path, _ckpt(2, merges=2), merges_from=1)
    assert first.stat().st_mtime_ns == stamp
    assert len(ck.load_checkpoint(tmp_path).merges) == 2


def test_client_state_keeps_two_files_and_loads_at_most_a_round(tmp_path: Path) -> None:
    for r in (1, 2, 4, 5):
        ck.save_client_state(tmp_path, r, {"x": torch.full((2,), float(r))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00004.safetensors", "round_00005.safetensors"]
    assert float(ck.load_client_state(tmp_path, at_most=4)["x"][0]) == 4.0  # resumed after round 4
    assert float(ck.load_client_state(tmp_path, at_most=9)["x"][0]) == 5.0
    assert ck.load_client_state(tmp_path, at_most=3) is None
    assert ck.load_client_state(tmp_path / "none", at_most=3) is None


# -- integrity: every damaged file is found before a resume, and named --------------------------------
def _damage(tmp_path: Path, how: str) -> Path:
    """Save a round-2 checkpoint with two merges and a client state, then damage one file ``how``."""
    ck.save_checkpoint(tmp_path, _ckpt(2, merges=2))
    ck.save_client_state(tmp_path / ck.CLIENT_STATE_DIR / "0", 2, {"x": torch.ones(3)})
    root = tmp_path / ck.CHECKPOINT_DIR
    round_dir = root / "round_00002"
    target = {
        "meta garbage": round_dir / "meta.json", "state truncated": round_dir / "state.safetensors",
        "state flipped": round_dir / "state.safetensors", "metrics line": round_dir / "metrics.jsonl",
        "merge flipped": root / "merges" / "merge_00001.safetensors", "merge missing": root / "merges" /
        "merge_00000.safetensors", "client truncated": tmp_path / ck.CLIENT_STATE_DIR / "0" / "round_00002.safetensors",
        "latest elsewhere": root / "LATEST",
    }[how]
    data = target.read_bytes()
    if how == "meta garbage":
        target.write_text("{garbage")
    elif how in ("state truncated", "client truncated"):
        target.write_bytes(data[: len(data) // 2])
    elif how in ("state flipped", "merge flipped"):
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif how == "metrics line":
        target.write_bytes(data + b"{not json\n")
    elif how == "merge missing":
        target.unlink()
    elif how == "latest elsewhere":
        target.write_text("round_00099")
    return target


@pytest.mark.parametrize("how,expected", [
    ("meta garbage", "cannot be read (JSONDecodeError"),
    ("state truncated", "differs from what was written"),
    ("state flipped", "differs from what was written"),
    ("metrics line", "differs from what was written"),
    ("merge flipped", "differs from what was written"),
    ("merge missing", "is missing"),
    ("client truncated", "cannot be read"),
    ("latest elsewhere", "names 'round_00099', which holds no meta.json"),
])
def test_a_damaged_checkpoint_is_found_and_the_file_named(tmp_path: Path, how: str, expected: str) -> None:
    latest = tmp_path / "missing" / "checkpoint" / "LATEST"
    assert ck.verify_checkpoint(tmp_path / "missing") == [f"{latest} is missing"]
    target = _damage(tmp_path, how)
    (problem,) = ck.verify_checkpoint(tmp_path)
    assert str(target.name) in problem and expected in problem, problem


def test_an_intact_checkpoint_passes(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, _ckpt(1, merges=1))
    ck.save_checkpoint(tmp_path, _ckpt(2, merges=2), merges_from=1)
    assert ck.verify_checkpoint(tmp_path) == [] and ck.checkpoint_round(tmp_path) == 2
    assert (tmp_path / ck.CHECKPOINT_DIR / "merges" / "merge_00000.sha256").is_file()


def test_a_damaged_checkpoint_refuses_the_resume_before_anything_starts(tmp_path: Path) -> None:
    import yaml
    from conftest import TINY, compose

    from fedlora.config.validate import validate
    from fedlora.core.errors import ConfigError

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(compose(TINY)))
    _damage(tmp_path, "state flipped")
    with pytest.raises(ConfigError) as info:
        validate(compose([*TINY, f"resume={tmp_path}"]), check_model=False, check_data=False)
    assert "the checkpoint cannot be resumed from:" in str(info.value)
    assert "state.safetensors differs from what was written" in str(info.value)
