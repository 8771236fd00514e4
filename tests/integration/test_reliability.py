"""Reliability end to end: same seed, same metrics; kill and resume; injected faults.

Same seed, same metrics is what every kill-and-resume test checks first: the killed run's rounds 0 to 2
(a second process with the same command) must equal the uninterrupted run's, record for record, before
the resumed rounds are compared; so no separate rerun is made.

Real `fedlora` commands (real MiniLM, Flower, Ray), tiny settings (3 clients, 2 local steps,
64 test articles). Two runs are killed and resumed: FLoRA + ComPEFT (the server holds base merges
and strategy state; every client holds the merges it applied and the error-feedback residual of
its classifier head, FLoRA's LoRA factors starting fresh every round) and FedAvg + ComPEFT both ways
(every client holds on disk an error-feedback residual of every tensor and the copies of its start
that the compressed downlink is relative to, the client state that cannot be rebuilt from the
server's checkpoint; the server checkpoints its mirror of each copy). A third, HetLoRA + ComPEFT with a
strong rank regulariser, is killed after its clients have pruned: the server's memory of each client's
rank (its checkpointed strategy state) and each client's residual, cut with its pruned slots, survive.
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
from conftest import FEDLORA, ROOT, TINY, jsonl_rows, run_fedlora, untimed

from fedlora.core.faults import FaultSettings, decide
from fedlora.core.lora_math import is_lora_key
from fedlora.results.checkpoint import load_client_state

pytestmark = pytest.mark.slow


def _straggler_seed() -> int:
    """A ``faults.seed`` under which, in round 3, client 0 trains at once and client 2 straggles.

    Stragglers only sleep (within round_timeout): the metrics stay those of a run without faults,
    timings aside. The pattern makes "mid-round 3" a state a test can wait for and hit every time:
    round 2 is checkpointed, client 0 is done with round 3 (with error feedback: its round-3
    residual is on disk), and client 2 is still asleep.
    """
    for seed in range(10_000):
        faults = FaultSettings.from_config({"straggler_prob": 0.5, "straggler_delay_s": 4.0, "seed": seed})
        if decide(faults, 0, 3, 0).delay_s == 0 and decide(faults, 0, 3, 2).delay_s > 0:
            return seed
    raise AssertionError("no fault seed gives the wanted pattern")


STRAGGLE = ["faults.straggler_prob=0.5", "faults.straggler_delay_s=4.0", f"faults.seed={_straggler_seed()}"]
RESUMABLE = {
    strategy: [*TINY, f"strategy={strategy}", "compression=compeft", "num_rounds=4", "logging.tensorboard=false",
               *STRAGGLE, *(["downlink=compeft"] if strategy == "fedavg" else []),
               *(["strategy.reg_weight=1.0"] if strategy == "hetlora" else [])]
    for strategy in ("flora", "fedavg", "hetlora")
}
# SCAFCOM: each client's control variate, momentum and copy of its start and of c on its disk, the server's c and
# its mirror of the copies in the checkpoint
RESUMABLE["scafcom"] = [*TINY, "strategy=fedavg", "compression=scafcom", "num_rounds=4", "logging.tensorboard=false",
                        "downlink=compeft", *STRAGGLE]


def _run_ok(args: list[str], run_dir: Path, timeout: int = 600) -> str:
    out = run_fedlora(args, run_dir, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module", params=sorted(RESUMABLE))
def uninterrupted(request: pytest.FixtureRequest,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    run_dir = tmp_path_factory.mktemp(f"uninterrupted_{request.param}") / "run"
    _run_ok(RESUMABLE[request.param], run_dir)
    return request.param, run_dir


def _wait_for(condition, proc: subprocess.Popen, timeout: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the point where the test kills it"
        assert time.monotonic() < deadline, "timed out waiting for the run to reach round 3"
        time.sleep(0.2)


# How the run is stopped in the middle of round 3: killed outright, or asked to stop (Ctrl-C in a terminal
# sends SIGINT to the whole process group, Ray's actors included; a service manager sends SIGTERM to the
# process), after which it must exit with status 130, keep round 2 as its last checkpoint and say how to
# resume. Either way the resumed run must equal the uninterrupted one.
STOPS = {"flora": ["SIGKILL", "SIGINT to the group"], "fedavg": ["SIGKILL", "SIGTERM to the process"],
         "hetlora": ["SIGKILL"], "scafcom": ["SIGKILL"]}


def _stop(proc: subprocess.Popen, how: str) -> None:
    if how == "SIGKILL":
        os.killpg(proc.pid, signal.SIGKILL)
    elif how == "SIGINT to the group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT to the group", "SIGTERM to the process"])
def test_stopped_mid_round_then_resumed_equals_uninterrupted(uninterrupted: tuple[str, Path], how: str,
                                                            tmp_path: Path) -> None:
    name, uninterrupted_dir = uninterrupted
    if how not in STOPS[name]:
        pytest.skip(f"{how} is checked on the other strategy's run")
    run_dir = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([FEDLORA, *RESUMABLE[name], f"hydra.run.dir={run_dir}"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ), start_new_session=True)
    latest = run_dir / "checkpoint" / "LATEST"

    def in_round_3() -> bool:
        # Round 2 is checkpointed and client 0 has trained in round 3 (with error feedback its
        # round-3 residual is on disk); client 2 sleeps 4 s before training (STRAGGLE).
        if not (latest.exists() and latest.read_text() == "round_00002"):
            return False
        if name in ("fedavg", "hetlora", "scafcom"):
            return (run_dir / "client_state" / "0" / "round_00003.safetensors").exists()
        time.sleep(1.0)  # FLoRA keeps no residual to wait for; round 3 stays open while client 2 sleeps 4 s
        return True

    try:
        _wait_for(in_round_3, proc, timeout=500)
        _stop(proc, how)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = (tmp_path / "killed.log").read_text()
    if how != "SIGKILL":  # a clean stop: status 130, the resume point named, no FAILED, Ray gone
        assert code == 130, output[-3000:]
        signame = how.split()[0]
        assert f"fedlora: stopped by {signame}; round 2 is its last complete round; resume with: " \
               f"fedlora resume={run_dir}" in output, output[-3000:]
        assert not (run_dir / "FAILED").exists() and "Traceback" not in output
    assert (run_dir / "checkpoint" / "LATEST").read_text() == "round_00002"
    assert not (run_dir / "summary.json").exists()
    assert [r["round"] for r in jsonl_rows(run_dir)] == [0, 1, 2]
    if name == "fedavg" and how == "SIGKILL":  # the kill came after client 0's round-3 residual, before client 2's
        assert not (run_dir / "client_state" / "2" / "round_00003.safetensors").exists()

    # the real command line: `fedlora resume=<run>` continues in the same directory
    out = subprocess.run([FEDLORA, f"resume={run_dir}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming after round 2" in out.stdout

    resumed, reference = untimed(jsonl_rows(run_dir)), untimed(jsonl_rows(uninterrupted_dir))
    assert [r["round"] for r in resumed] == [0, 1, 2, 3, 4]
    # The first round after a resume resends every base merge (the clients' processes are new), so
    # its downlink is larger; everything else, every accuracy, loss and byte up, is identical.
    for row in (resumed[3], reference[3]):
        down = row.pop("bytes_down_total")
        for client in row["clients"]:
            down -= client.pop("bytes_down")
        assert down == 0
    assert resumed == reference
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((uninterrupted_dir / "summary.json").read_text())
    assert summary["final_test_accuracy"] == expected["final_test_accuracy"]
    a = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == (uninterrupted_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert summary["error_feedback"] is (name != "scafcom")  # SCAFCOM's feedback is its control variates
    if name == "fedavg":  # both ways: each client's copy of its start is on its disk with the residual
        assert summary["downlink_compression"] == "ComPEFT"
        for cid in range(3):
            kept = load_client_state(run_dir / "client_state" / str(cid), at_most=4) or {}
            assert any(k.startswith("view|4|") for k in kept) and any(is_lora_key(k) for k in kept), sorted(kept)
    if name == "hetlora":  # clients pruned their rank: the server's memory of it and their residuals agree
        from fedlora.core.lora_math import rank_of
        from fedlora.results.checkpoint import load_checkpoint

        ranks = {k: int(v) for k, v in load_checkpoint(run_dir).strategy_state.items()}
        assert ranks == {f"rank/{c['client']}": c["rank"] for c in resumed[4]["clients"]}
        assert any(c["rank"] < r for c, r in zip(resumed[4]["clients"], (2, 4, 8), strict=True)), resumed[4]
        for c in resumed[4]["clients"]:
            kept = load_client_state(run_dir / "client_state" / str(c["client"]), at_most=4) or {}
            lora = {k.split("|")[-1]: v for k, v in kept.items() if is_lora_key(k)}
            assert lora and rank_of(lora) == c["rank"], (c, sorted(kept))
    if name == "scafcom":  # the server's checkpointed c and the clients' own c_k, on their disks
        from fedlora.core import control as ctl
        from fedlora.results.checkpoint import load_checkpoint

        control = load_checkpoint(run_dir).control
        owns = [ctl.split_client_state(load_client_state(run_dir / "client_state" / str(cid), at_most=4))[0]
                for cid in range(3)]
        assert all(owns) and control
        assert summary["downlink_compression"] == "ComPEFT"
        for cid in range(3):  # c travels in the compressed copy, which each client keeps
            kept = load_client_state(run_dir / "client_state" / str(cid), at_most=4) or {}
            assert any(k.startswith("view|4|control/") for k in kept), sorted(kept)
        sizes = {c["client"]: c["num_examples"] for c in resumed[1]["clients"]}  # FedAvg weighs by examples
        weights = [sizes[cid] / sum(sizes.values()) for cid in range(3)]
        for key, c in control.items():  # c = sum_i w_i c_i
            mean = sum(w * ctl.pad_to(own[key], key, tuple(c.shape)) for w, own in zip(weights, owns, strict=True))
            torch.testing.assert_close(c, mean, rtol=1e-5, atol=1e-7)
    if name == "flora":  # fresh LoRA factors every round: only the classifier head keeps a residual
        assert summary["base_merges"] == 4
        assert summary["error_feedback_tensors"] == "all but the fresh LoRA factors"
        for cid in range(3):
            kept = load_client_state(run_dir / "client_state" / str(cid), at_most=4)
            assert kept and not any(is_lora_key(k) for k in kept), sorted(kept or {})


def _fault_seed(settings: dict, wanted) -> int:  # noqa: ANN001
    """The first ``faults.seed`` whose decisions for 3 clients and 2 rounds satisfy ``wanted``."""
    for seed in range(10_000):
        faults = FaultSettings.from_config({**settings, "seed": seed})
        plan = {(r, c): decide(faults, 0, r, c) for r in (1, 2) for c in range(3)}
        if wanted(plan):
            return seed
    raise AssertionError("no fault seed gives the wanted pattern")


def test_injected_failures_stragglers_and_malformed_updates(tmp_path: Path) -> None:
    settings = {"fail_prob": 0.3, "straggler_prob": 0.3, "straggler_delay_s": 40.0, "corrupt_prob": 0.3,
                "corrupt_kind": "nan"}

    def wanted(plan: dict) -> bool:
        r1 = [plan[1, c] for c in range(3)]
        r2 = [plan[2, c] for c in range(3)]
        return (  # round 1: one fails, one sends NaN, one is fine -> 1 valid < min_fit_clients=2
            sorted((d.fail, d.corrupt is not None and not d.fail, d.delay_s > 0) for d in r1)
            == [(False, False, False), (False, True, False), (True, False, False)]
            # round 2: one straggles past the timeout, two are fine -> aggregated
            and sorted((d.fail, d.corrupt is not None, d.delay_s > 0) for d in r2)
            == [(False, False, False), (False, False, False), (False, False, True)])

    seed = _fault_seed(settings, wanted)
    faults = FaultSettings.from_config({**settings, "seed": seed})
    overrides = [f"faults.{k}={v}" for k, v in settings.items()] + [f"faults.seed={seed}"]
    run_dir = tmp_path / "run"
    log = _run_ok([*TINY, *overrides, "min_fit_clients=2", "round_timeout=25", "logging.tensorboard=false"],
                  run_dir)
    rows = jsonl_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        for client in row["clients"]:
            d = decide(faults, 0, row["round"], client["client"])
            if d.fail:
                assert client["status"] == "failed" and "injected failure" in client["error"], client
            elif d.delay_s > 0:
                assert client["status"] == "failed" and "round_timeout=25" in client["error"], client
            elif d.corrupt:
                assert client["status"] == "rejected" and "NaN" in client["error"], client
            else:
                assert client["status"] == "ok", client
    # round 1: one valid update is fewer than min_fit_clients=2: nothing aggregated, global kept
    assert rows[1]["num_ok"] == 1 and rows[1]["num_failed"] == 1 and rows[1]["num_rejected"] == 1
    assert "min_fit_clients=2" in rows[1]["aggregation_skipped"]
    assert rows[1]["test_accuracy"] == rows[0]["test_accuracy"] and rows[1]["test_loss"] == rows[0]["test_loss"]
    # round 2: the straggler's reply is lost, the two others are aggregated
    assert rows[2]["num_ok"] == 2 and rows[2]["num_failed"] == 1 and "aggregation_skipped" not in rows[2]
    assert rows[2]["test_loss"] != rows[1]["test_loss"]
    assert all(math.isfinite(r["test_loss"]) for r in rows)
    assert "1 rejected" in log and "(aggregation skipped)" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert math.isfinite(summary["final_test_loss"])


REASONS = {"nan": "NaN", "inf": "infinite", "shape": "wrong shape", "rank": "wrong rank",
           "missing_key": "missing keys", "extra_key": "unexpected keys", "scale": "max_norm_ratio=10"}


def test_every_malformed_update_kind_is_rejected_and_the_run_goes_on(tmp_path: Path) -> None:
    # 9 clients, one round: clients 1..7 each send one kind of malformed update, 0 and 8 are honest
    kinds = dict(enumerate(REASONS, start=1))
    corrupt = "{" + ", ".join(f"{c}: {k}" for c, k in kinds.items()) + "}"
    run_dir = tmp_path / "run"
    _run_ok([*TINY, "num_clients=9", "num_rounds=1", f"faults.corrupt={corrupt}", "logging.tensorboard=false"],
            run_dir)
    row = jsonl_rows(run_dir)[1]
    by_client = {c["client"]: c for c in row["clients"]}
    for cid, kind in kinds.items():
        assert by_client[cid]["status"] == "rejected", (kind, by_client[cid])
        assert REASONS[kind] in by_client[cid]["error"], (kind, by_client[cid]["error"])
    assert by_client[0]["status"] == by_client[8]["status"] == "ok"
    assert row["num_ok"] == 2 and row["num_rejected"] == 7 and "aggregation_skipped" not in row
    assert math.isfinite(row["test_loss"])
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(bool(v.isfinite().all()) for v in weights.values())


def test_ctrl_c_during_a_long_round_stops_within_seconds(tmp_path: Path) -> None:
    # Every client sleeps 30 s in round 1 (round_timeout 600 s): the run must not wait for them.
    run_dir = tmp_path / "run"
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen([FEDLORA, *TINY, "num_rounds=3", "faults.straggler_prob=1.0",
                             "faults.straggler_delay_s=30", "round_timeout=600", f"hydra.run.dir={run_dir}"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                            start_new_session=True)
    try:
        _wait_for(lambda: (run_dir / "checkpoint" / "LATEST").exists(), proc, timeout=300)
        time.sleep(2.0)  # round 1 is under way: every client asleep
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = (tmp_path / "run.log").read_text()
    assert "SIGINT received: stopping" in output and "round 0 is its last complete round" in output
    assert (run_dir / "checkpoint" / "LATEST").read_text() == "round_00000"
    assert [r["round"] for r in jsonl_rows(run_dir)] == [0]
