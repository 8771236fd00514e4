"""End to end through the real `fedlora` command: real MiniLM, real Flower apps on real Ray.

Each run is tiny (3 clients, 2 rounds, 2 local steps, 64 test articles) but touches every part:
Hydra composition, validation, the simulation engine, per-rank adapters, the strategy, metrics,
the peft checkpoint and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_fedlora

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, extra: list[str]) -> tuple[Path, dict, list[dict], str]:
    run_dir = tmp_path / "run"
    out = run_fedlora([*TINY, *extra], run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, summary, rows, out.stdout + out.stderr


def _reload_accuracy(run_dir: Path) -> float:
    """Load the saved adapter with plain peft on the pristine base and evaluate the test set."""
    from peft import PeftModel

    from fedlora.config import workspace_key
    from fedlora.models import load_base_model
    from fedlora.training.local import evaluate
    from fedlora.training.workspace import Workspace

    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ws = Workspace(workspace_key(cfg))
    base = load_base_model(cfg["model"]["name"], len(ws.label_names), seed=12345)  # different head seed
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    _, acc = evaluate(model, ws.data, ws.test)
    return acc


def _check_common(run_dir: Path, summary: dict, rows: list[dict], log: str) -> None:
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["num_ok"] == 3 and row["num_failed"] == 0
        assert {c["rank"] for c in row["clients"]} == {2, 4, 8}
        for client in row["clients"]:
            assert client["bytes_up"] > 0 and client["bytes_down"] > 0 and client["num_examples"] > 0
        assert row["train_loss"] is not None and row["wall_time"] > 0
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert "round 2/2" in log and "done: final test accuracy" in log
    assert "deprecated" not in log.lower(), "our path must not print deprecation warnings"
    assert _reload_accuracy(run_dir) == pytest.approx(summary["final_test_accuracy"], abs=1e-9)


def test_fedavg_end_to_end(tmp_path: Path) -> None:
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=fedavg"])
    _check_common(run_dir, summary, rows, log)
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(torch.isfinite(t).all() for t in b)
    assert max(float(t.abs().max()) for t in b) > 0, "B starts at zero: training must have changed it"
    # mixed ranks: a rank-2 client receives and sends fewer bytes than a rank-8 client
    by_rank = {c["rank"]: c for c in rows[1]["clients"]}
    assert by_rank[2]["bytes_down"] < by_rank[8]["bytes_down"]
    assert by_rank[2]["bytes_up"] < by_rank[8]["bytes_up"]
