"""Causal-LM instruction tuning end to end: the real `fedlora` command, real Flower apps on real Ray.

The tiny random decoder (no download) on synthetic instructions, 3 clients of ranks 2/4/8, every
strategy. Each run checks that the held-out loss falls, that perplexity is exp(loss), that the
generations and the reloadable base are written, and that the saved adapter, loaded with plain
transformers + peft on the saved base, reproduces the reported held-out loss.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import FEDLORA, ROOT, TINY_CAUSAL, jsonl_rows, run_fedlora, untimed

pytestmark = pytest.mark.slow



def _run(run_dir: Path, extra: list[str]) -> tuple[dict, list[dict], str]:
    out = run_fedlora([*TINY_CAUSAL, *extra], run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary, jsonl_rows(run_dir), out.stdout + out.stderr


def _reload(run_dir: Path):  # noqa: ANN202 - (workspace, peft model)
    """The saved base and adapter, loaded the way the README tells a user to, plus this run's data."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.config.settings import Settings
    from fedlora.runtime.training.workspace import Workspace

    ws = Workspace(Settings.from_config(yaml.safe_load((run_dir / "config.yaml").read_text())).workspace_key())
    base = AutoModelForCausalLM.from_pretrained(str(run_dir / "base"))
    return ws, PeftModel.from_pretrained(base, str(run_dir / "adapter"))


def _check(run_dir: Path, summary: dict, rows: list[dict], log: str, rounds: int = 2, rel: float = 1e-6,
           drop: float = 0.5) -> tuple:
    """The common checks; ``drop``: how much the held-out loss must fall from round 0 (nats/token)."""
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for row in rows:
        assert row["test_perplexity"] == pytest.approx(math.exp(row["test_loss"]), rel=1e-12)
        assert row["test_tokens"] == rows[0]["test_tokens"] > 0
    losses = [r["test_loss"] for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - drop, losses
    assert summary["primary_metric"] == "test_perplexity"
    assert summary["final_test_perplexity"] == rows[-1]["test_perplexity"]
    assert summary["best_test_perplexity"] == min(r["test_perplexity"] for r in rows)
    assert "test_accuracy" not in rows[-1] and "final_test_accuracy" not in summary
    assert f"round {rounds}/{rounds}: test perplexity" in log and "done: final test perplexity" in log
    assert "deprecated" not in log.lower(), "our path must not print deprecation warnings"
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    generations = jsonl_rows(run_dir, "generations.jsonl")
    assert [g["round"] for g in generations] == [r for r in range(rounds + 1) for _ in range(3)]
    assert {g["category"] for g in generations} == {"arithmetic", "copy", "reverse"}  # categories in turn
    assert all(g["reference"] and isinstance(g["output"], str) for g in generations)
    md = (run_dir / "generations.md").read_text()
    assert md.count("## Example") == 3 and md.count(f"| {rounds} |") == 3
    ws, model = _reload(run_dir)
    reloaded = ws.task.evaluate(model, ws.data, ws.test, 64)
    assert reloaded["test_loss"] == pytest.approx(summary["final_test_loss"], rel=rel)
    return ws, model, generations


def test_fedavg_causal_lm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary, rows, log = _run(run_dir, ["strategy=fedavg"])
    ws, model, generations = _check(run_dir, summary, rows, log)
    for row in rows[1:]:
        assert row["num_ok"] == 3 and {c["rank"] for c in row["clients"]} == {2, 4, 8}
    by_rank = {c["rank"]: c for c in rows[1]["clients"]}
    assert by_rank[2]["bytes_up"] < by_rank[4]["bytes_up"] < by_rank[8]["bytes_up"]
    # no head: the adapter is LoRA factors only, 2 layers x 4 projections x (A, B)
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert len(weights) == 16 and all("lora_" in k for k in weights)
    # greedy decoding of the reloaded model reproduces the last round's generations exactly
    last = [g for g in generations if g["round"] == 2]
    again = ws.task.generate(model, ws.generation_prompts)
    assert [g["output"] for g in again] == [g["output"] for g in last]


def test_each_client_evaluates_the_causal_lm_on_its_own_held_out_instructions(tmp_path: Path) -> None:
    # perplexity: the worst client is the one with the highest; each client's number is the saved model's
    run_dir = tmp_path / "run"
    summary, rows, log = _run(run_dir, ["strategy=fedavg", "data.client_test_fraction=0.3"])
    final = rows[-1]["client_eval"]
    per_client = {c["client"]: c["test_perplexity"] for c in final["clients"]}
    assert sorted(per_client) == [0, 1, 2] and final["num_failed"] == 0
    assert final["worst"] == max(per_client.values()) and final["worst_client"] == max(per_client, key=per_client.get)
    assert summary["client_worst_test_perplexity"] == final["worst"]
    assert summary["client_worst_id"] == final["worst_client"]
    assert "clients' own held-out data: mean test perplexity" in log
    ws, model = _reload(run_dir)
    for cid, held in enumerate(ws.client_tests):
        again = ws.task.evaluate(model, ws.data, held, 64)
        assert again["test_perplexity"] == pytest.approx(per_client[cid], rel=1e-6)


def test_flora_causal_lm_merges_fold_into_the_saved_adapter(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary, rows, log = _run(run_dir, ["strategy=flora"])
    assert summary["base_merges"] == 2 and summary["adapter_rank"] == 8 + 2 * 14
    for row in rows[1:]:
        assert row["strategy"]["stacked_rank"] == 2 + 4 + 8
    # the server evaluated W0 + merges (fp32 weights); the reload runs W0 + folded LoRA: same function
    _check(run_dir, summary, rows, log, rel=1e-4)


def test_ffa_lora_causal_lm_keeps_a_frozen(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary, rows, log = _run(run_dir, ["strategy=ffa_lora"])
    _check(run_dir, summary, rows, log, drop=0.2)  # only B learns: slower at 3 steps a round
    from safetensors.torch import load_file

    from fedlora.core.lora_math import init_lora_a

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for key in (k for k in weights if "lora_A" in k):
        assert torch.equal(weights[key], init_lora_a(0, key.replace(".lora_A.weight", ""), 8, 64))


def test_lora_fair_causal_lm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary, rows, log = _run(run_dir, ["strategy=lora_fair"])
    _check(run_dir, summary, rows, log)
    assert all(r["strategy"]["fair_error_rel"] < r["strategy"]["fedavg_error_rel"] for r in rows[1:])
    assert all(r["strategy"]["delta_b_rel"] > 0 for r in rows[1:])


def test_centralized_causal_lm(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary, rows, log = _run(run_dir, ["strategy=centralized"])
    assert summary["bytes_up_total"] == 0 and summary["adapter_rank"] == 8
    _check(run_dir, summary, rows, log)


# Every client sleeps 1.5 s before training (a straggler that stays within round_timeout: only the
# timings change), so that a kill shortly after round 1's checkpoint lands inside round 2.
RESUMABLE = ["strategy=flora", "compression=compeft", "num_rounds=3", "faults.straggler_prob=1.0",
             "faults.straggler_delay_s=1.5"]


@pytest.fixture(scope="module")
def flora_compeft(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("flora_compeft") / "run"
    summary, rows, log = _run(run_dir, RESUMABLE)
    assert summary["compression"] == "ComPEFT"
    return run_dir, log


def test_compeft_causal_lm(flora_compeft: tuple[Path, str]) -> None:
    flora_compeft, log = flora_compeft
    summary, rows = json.loads((flora_compeft / "summary.json").read_text()), jsonl_rows(flora_compeft)
    for client in rows[1]["clients"]:  # vs the fp32 LoRA factors of 8 projections (64 x 64) at its rank
        raw = 8 * client["rank"] * (64 + 64) * 4
        # rank 8 compresses 6x and more; the tiny rank-2 tensors are dominated by key names
        assert client["bytes_up"] * (6 if client["rank"] == 8 else 1) < raw, client
    # FLoRA's LoRA factors are fresh every round and a decoder has no classifier head: no tensor
    # carries a residual, so none is kept or written
    assert summary["error_feedback_tensors"] == "all but the fresh LoRA factors"
    assert not (flora_compeft / "client_state").exists()
    _check(flora_compeft, summary, rows, log, rounds=3, rel=1e-4, drop=0.1)


def test_causal_lm_killed_mid_round_then_resumed_equals_uninterrupted(flora_compeft: tuple[Path, str],
                                                                      tmp_path: Path) -> None:
    flora_compeft, _ = flora_compeft
    run_dir = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([FEDLORA, *TINY_CAUSAL, *RESUMABLE, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                            start_new_session=True)
    latest = run_dir / "checkpoint" / "LATEST"
    deadline = time.monotonic() + 400
    try:  # round 1 is checkpointed; the clients of round 2 sleep 1.5 s before training: mid-round 2
        while not (latest.exists() and latest.read_text() == "round_00001"):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached round 2"
            time.sleep(0.1)
        time.sleep(0.5)
        assert proc.poll() is None and not (run_dir / "checkpoint" / "round_00002").exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run_dir / "summary.json").exists()
    out = subprocess.run([FEDLORA, f"resume={run_dir}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming after round 1" in out.stdout
    resumed, reference = untimed(jsonl_rows(run_dir)), untimed(jsonl_rows(flora_compeft))
    for row in (resumed[2], reference[2]):  # the first round after a resume resends every base merge
        row.pop("bytes_down_total")
        for client in row["clients"]:
            client.pop("bytes_down")
    assert resumed == reference
    assert jsonl_rows(run_dir, "generations.jsonl") == jsonl_rows(flora_compeft, "generations.jsonl")
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == (
        flora_compeft / "adapter" / "adapter_model.safetensors").read_bytes()
