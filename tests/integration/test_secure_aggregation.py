"""Secure aggregation in a run: real Flower simulation (Ray), real ClientApps with Flower's SecAgg+ mod.

A secure round's aggregate equals the plain run's within the quantization bound
(:func:`fedlora.core.secure.error_bound`), also when a client drops out mid-protocol (here: it
refuses its own non-finite update in the masked-vector stage, after its key shares went out); a
rerun sums bit for bit the same (the quantization is seeded); what the server records is what it
can know (reports and bytes per client, no per-client vector).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import PRIVACY_MODES, PRIVACY_OPTIONS, TINY, privacy_extra, run_fedlora
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ONE_ROUND = [*TINY, "num_rounds=1", "logging.tensorboard=false"]


def _run(run_dir: Path, extra: list[str]) -> tuple[dict[str, torch.Tensor], list[dict], str]:
    out = run_fedlora([*ONE_ROUND, *extra], run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors")), rows, out.stdout + out.stderr


def _bound(rows: list[dict], clients: int) -> float:
    from fedlora.core.secure import SecureSettings, error_bound, max_weight

    ok = [c for c in rows[1]["clients"] if c["status"] == "ok"]
    weight = max_weight([c["num_examples"] for c in rows[1]["clients"] if c.get("num_examples")])
    return error_bound(SecureSettings(), weight, sum(c["num_examples"] for c in ok), clients)


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("strategy", ["fedavg", "ffa_lora"])
def test_a_secure_round_aggregates_what_the_plain_round_does_and_reruns_bitwise(strategy: str,
                                                                                tmp_path: Path) -> None:
    plain, _, _ = _run(tmp_path / "plain", [f"strategy={strategy}"])
    secure, rows, log = _run(tmp_path / "secure", [f"strategy={strategy}", "privacy=secagg"])
    assert "secure aggregation (SecAgg+" in log and "max_norm_ratio=10 is not applied" in log
    row = rows[1]
    assert row["num_ok"] == 3 and "aggregation_skipped" not in row and not row.get("strategy")
    for client in row["clients"]:
        # every stage's messages count; the masked vector is the rank-8 layout whatever the client's rank
        assert client["status"] == "ok" and client["bytes_up"] > 0 and client["num_examples"] > 0
    up = [c["bytes_up"] for c in row["clients"]]  # the same layout for ranks 2, 4 and 8 (reports differ a little)
    assert max(up) - min(up) < 100 < min(up)
    bound = _bound(rows, 3)
    assert 0 < _gap(plain, secure) <= bound, (_gap(plain, secure), bound)
    again, _, _ = _run(tmp_path / "again", [f"strategy={strategy}", "privacy=secagg"])
    assert _gap(secure, again) == 0.0


def test_a_uniformly_weighted_strategy_weighs_each_vector_once_in_the_secure_sum(tmp_path: Path) -> None:
    """``strategy.weighting=uniform`` under secure aggregation: each client's vector weighs 1 (not its example
    count), so the secure mean is the plain run's uniform mean, not the example-weighted one."""
    from fedlora.core.secure import SecureSettings, error_bound

    uniform = ["strategy=ffa_lora", "strategy.weighting=uniform"]
    plain, _, _ = _run(tmp_path / "plain", uniform)
    secure, rows, _ = _run(tmp_path / "secure", [*uniform, "privacy=secagg"])
    assert rows[1]["num_ok"] == 3
    assert len({c["num_examples"] for c in rows[1]["clients"]}) == 3  # so weighing by examples would differ
    bound = error_bound(SecureSettings(), 1, 3.0, 3)  # W = 1, each of the 3 vectors weighing 1
    assert 0 < _gap(plain, secure) <= bound, (_gap(plain, secure), bound)


# client-level DP with a small clip (every client clipped) and noise: the same noise in both runs
CLIENT_DP = ["privacy=dp_fedavg", "privacy.clip=0.02", "privacy.noise_multiplier=0.5"]


def _dp_bound(clients: int, denominator: int) -> float:
    # each client's vector weighs W/W = 1: one quantization step 2c/T per client and entry, divided by m,
    # plus the float32 rounding of the released adapter
    from fedlora.core.secure import SecureSettings

    s = SecureSettings()
    return clients * 2.0 * s.clipping_range / s.quantization_range / denominator + 1e-6


def test_client_level_dp_under_secure_aggregation_releases_what_the_plain_mechanism_does(tmp_path: Path) -> None:
    # each client clips its own change against the global adapter at the largest rank, masks it with weight
    # W (every client weighs the same), and the server adds the noise to the unmasked sum: the released
    # model equals plain DP-FedAvg's (the server clipping in the clear, the same noise) within quantization
    plain, plain_rows, _ = _run(tmp_path / "plain", CLIENT_DP)
    secure, rows, log = _run(tmp_path / "secure", [*CLIENT_DP, "privacy.secure=true"])
    assert "secure aggregation (SecAgg+" in log and "client-level DP (DP-FedAvg)" in log
    assert plain_rows[1]["strategy"]["dp_clipped_fraction"] == 1.0  # the clip binds for every client
    assert rows[1]["num_ok"] == 3 and not rows[1].get("strategy")  # the server sees no client's norm
    assert rows[1]["dp_epsilon"] == plain_rows[1]["dp_epsilon"] > 0
    assert 0 < _gap(plain, secure) <= _dp_bound(3, 3), _gap(plain, secure)
    # the clients' vectors are the largest rank's layout, and the reference they clip against came down with
    # the start: each client received the global adapter's uplink tensors at rank 8 besides its own start
    plain_down = {c["client"]: c["bytes_down"] for c in plain_rows[1]["clients"]}
    assert all(c["bytes_down"] > plain_down[c["client"]] for c in rows[1]["clients"])


@pytest.mark.parametrize("privacy", ["secagg", "dp_fedavg"])
def test_a_client_dropping_out_mid_protocol_leaves_the_sum_of_the_others(privacy: str, tmp_path: Path) -> None:
    # 4 clients, client 1 sends a non-finite update: the plain server rejects it; under secure
    # aggregation the client refuses to send it (the server could not), so it drops out at the
    # masked-vector stage after its shares went out, and the server removes its pairwise masks.
    # Under client-level DP too: the fixed denominator (4, the clients sampled) does not count the dropout.
    extra = ["num_clients=4", "ranks.tiers=[2,4,8,8]", "faults.corrupt={1: nan}",
             "secure_aggregation.num_shares=3", "secure_aggregation.threshold=2"]
    if privacy == "dp_fedavg":
        extra = [*extra, *CLIENT_DP]
    plain, plain_rows, _ = _run(tmp_path / "plain", extra)
    secure, rows, log = _run(tmp_path / "secure", [*extra, "privacy.secure=true" if privacy == "dp_fedavg"
                                                   else "privacy=secagg"])
    assert [c["status"] for c in plain_rows[1]["clients"]] == ["ok", "rejected", "ok", "ok"]
    dropped = rows[1]["clients"][1]
    assert dropped["status"] == "failed" and "collect_masked_vectors stage" in dropped["error"]
    assert "non-finite" in dropped["error"] and "client 1 failed" in log
    assert [c["status"] for c in rows[1]["clients"]] == ["ok", "failed", "ok", "ok"]
    bound = _bound(rows, 3) if privacy == "secagg" else _dp_bound(3, 4)
    assert 0 < _gap(plain, secure) <= bound, (_gap(plain, secure), bound)


def test_under_secure_aggregation_every_client_evaluates_the_released_model_on_its_own_data(tmp_path: Path) -> None:
    # evaluation messages are not training messages: SecAgg+ masks only what clients train, and each client's
    # answer is its accuracy on its held-out articles, recomputed here from the saved adapter with plain peft
    from conftest import reload_client_accuracies

    _, rows, log = _run(tmp_path / "run", ["privacy=secagg", "data.client_test_fraction=0.3"])
    final = rows[-1]["client_eval"]
    assert final["num_failed"] == 0 and [c["client"] for c in final["clients"]] == [0, 1, 2]
    assert "clients' own held-out data" in log
    own = reload_client_accuracies(tmp_path / "run")
    assert [c["test_accuracy"] for c in final["clients"]] == pytest.approx(own, abs=1e-9)


def compatible(mode: str) -> tuple[list[str], list[list[str]]]:
    """What validation lets through with ``mode``: the plain strategies (one sweep) and the option sets (one run
    each). tests/test_privacy.py checks that everything else is refused with its reason."""
    from conftest import compose, privacy_strategies

    from fedlora.config.validate import validate
    from fedlora.core.errors import ConfigError

    def passes(overrides: list[str]) -> bool:
        try:
            validate(compose([*overrides, *mode.split()]), check_model=False, check_data=False)
        except ConfigError:
            return False
        return True

    plain = [n for n in privacy_strategies() if passes([f"strategy={n}", *privacy_extra(n)])]
    return plain, [o for o in PRIVACY_OPTIONS if passes(o)]


@pytest.mark.parametrize("mode", PRIVACY_MODES)
def test_every_compatible_strategy_and_privacy_mode_runs_end_to_end(mode: str, tmp_path: Path) -> None:
    import subprocess

    from conftest import FEDLORA, ROOT

    plain, options = compatible(mode)
    # not vacuous: the linear strategies pass every mode, and DP-SGD every strategy but HetLoRA's pruning
    assert {"fedavg", "ffa_lora", "rolora"} <= set(plain), plain
    if mode == "privacy=dp_sgd":
        assert len(plain) == 9 and "hetlora" not in plain and len(options) == len(PRIVACY_OPTIONS), (plain, options)
    runs = [[f"strategy={','.join(n for n in plain if not privacy_extra(n))}"]]
    runs += [[f"strategy={n}", *privacy_extra(n)] for n in plain if privacy_extra(n)] + options
    for i, run in enumerate(runs):
        sweep = tmp_path / f"sweep{i}"
        out = subprocess.run([FEDLORA, "-m", *ONE_ROUND, *mode.split(), *run, f"hydra.sweep.dir={sweep}"],
                             capture_output=True, text=True, timeout=1800, cwd=ROOT)
        assert out.returncode == 0, (run, out.stdout[-3000:] + out.stderr[-3000:])
        jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
        assert len(jobs) == (len(run[0].split(",")) if i == 0 else 1), [p.name for p in jobs]
        for job in jobs:
            summary = json.loads((job / "summary.json").read_text())
            rows = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
            assert rows[1]["num_ok"] >= 1 and "aggregation_skipped" not in rows[1], (job.name, rows[1])
            assert 0.0 <= summary["final_test_accuracy"] <= 1.0, (job.name, summary)
            private = "dp_" in mode
            assert (summary.get("dp_epsilon") is not None) == private, (job.name, summary)
            if "secagg" in mode or "secure=true" in mode:
                assert all(c["bytes_up"] > 0 for c in rows[1]["clients"]) and not rows[1].get("strategy")
