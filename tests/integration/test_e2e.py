"""End to end through the real `fedlora` command: real MiniLM, real Flower apps on real Ray.

Each run is tiny (3 clients, 2 rounds, 2 local steps, 64 test articles) but touches every part:
Hydra composition, validation, the simulation engine, per-rank adapters, the strategy, metrics,
the peft checkpoint and the plot.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, reload_accuracy, reload_client_accuracies, run_fedlora
from test_golden import check_golden

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, extra: list[str]) -> tuple[Path, dict, list[dict], str]:
    run_dir = tmp_path / "run"
    out = run_fedlora([*TINY, *extra], run_dir)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, summary, rows, out.stdout + out.stderr


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
    assert reload_accuracy(run_dir) == pytest.approx(summary["final_test_accuracy"], abs=1e-9)


def test_fedavg_end_to_end(tmp_path: Path) -> None:
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=fedavg"])
    _check_common(run_dir, summary, rows, log)
    check_golden("fedavg", run_dir)  # the golden file's case: the same command line (tests/golden)
    # it learns: two rounds of two steps lift the untrained head's accuracy (0.18 on these 65 articles)
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] + 0.1 and rows[-1]["test_loss"] < rows[0]["test_loss"]
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all(torch.isfinite(t).all() for t in b)
    assert max(float(t.abs().max()) for t in b) > 0, "B starts at zero: training must have changed it"
    # mixed ranks: a rank-2 client receives and sends fewer bytes than a rank-8 client
    by_rank = {c["rank"]: c for c in rows[1]["clients"]}
    assert by_rank[2]["bytes_down"] < by_rank[8]["bytes_down"]
    assert by_rank[2]["bytes_up"] < by_rank[8]["bytes_up"]


def test_flora_end_to_end_merges_persist_across_rounds(tmp_path: Path) -> None:
    # 3 rounds: round 3 only works if each client kept the merges of earlier rounds in its state.
    # Each client also holds out 30% of its articles and evaluates the global model on them after rounds 2 and 3
    # (Flower evaluate messages, which carry the merges a client lacks).
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=flora", "num_rounds=3", "data.client_test_fraction=0.3",
                                                  "eval.client_every=2"])
    assert [("client_eval" in r) for r in rows] == [False, False, True, True]
    for row in rows[2:]:
        evaluation = row["client_eval"]
        assert evaluation["num_failed"] == 0 and [c["client"] for c in evaluation["clients"]] == [0, 1, 2]
        assert all(c["num_examples"] > 0 and 0 <= c["test_accuracy"] <= 1 for c in evaluation["clients"])
    # each client's number is the saved model (merges folded in, reloaded with plain peft) on its held-out articles
    final = rows[-1]["client_eval"]
    own = reload_client_accuracies(run_dir)
    assert [c["test_accuracy"] for c in final["clients"]] == pytest.approx(own, abs=1e-9)
    assert summary["client_mean_test_accuracy"] == pytest.approx(sum(own) / 3, abs=1e-9)
    assert summary["client_worst_test_accuracy"] == pytest.approx(min(own), abs=1e-9)
    assert "clients' own held-out data: mean test accuracy" in log
    assert all(r["num_failed"] == 0 for r in rows[1:])
    assert summary["base_merges"] == 3
    for row in rows[1:]:
        assert row["strategy"]["stacked_rank"] == 2 + 4 + 8  # sum of the participants' ranks
    # round 1 sends only the head (fresh adapters); later rounds also carry the new stacked merge
    assert rows[2]["bytes_down_total"] > 10 * rows[1]["bytes_down_total"]
    # the saved adapter folds the 3 merges in: it loads on the pristine base and scores the same
    assert summary["adapter_rank"] == 8 + 3 * 14
    assert reload_accuracy(run_dir) == pytest.approx(summary["final_test_accuracy"], abs=1e-9)


def test_fedsa_lora_end_to_end_b_and_the_head_never_leave_the_clients(tmp_path: Path) -> None:
    from peft import PeftModel

    from fedlora.config.settings import Settings
    from fedlora.core import lora_math as lm
    from fedlora.results.checkpoint import load_checkpoint, load_client_state
    from fedlora.runtime.models import load_base_model
    from fedlora.runtime.training.local import evaluate
    from fedlora.runtime.training.workspace import Workspace
    from strategies.fedsa_lora import personal_model

    run_dir, summary, rows, log = _run(tmp_path, ["strategy=fedsa_lora", "data.client_test_fraction=0.3"])
    assert [("client_eval" in r) for r in rows] == [True, True, True]  # its clients evaluate every round
    a_floats = 384 * 12  # n x modules: 6 layers' query and value of MiniLM
    for row in rows[1:]:
        for c in row["clients"]:  # only A goes up (and after round 1, only A comes down)
            assert c["status"] == "ok" and 4 * c["rank"] * a_floats <= c["bytes_up"] < 4 * c["rank"] * a_floats + 4000
    assert all(c["bytes_down"] < 4 * c["rank"] * a_floats + 4000 for c in rows[2]["clients"])
    assert all(c["bytes_down"] > 4 * c["rank"] * a_floats + 4000 for c in rows[1]["clients"])  # first: B, head too
    # each client's own B and head are in its state file; its evaluation is of the shared A with them
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    ws = Workspace(Settings.from_config(cfg).workspace_key())
    shared = load_checkpoint(run_dir).adapter
    final = rows[-1]["client_eval"]
    for c in rows[-1]["clients"]:
        saved = load_client_state(run_dir / "client_state" / str(c["client"]), at_most=2) or {}
        own = {k.split("|", 2)[2]: v for k, v in saved.items() if k.startswith("own|2|")}
        assert own and any(".lora_B." in k for k in own) and any("classifier" in k for k in own)
        ws.host.load_state(c["rank"], personal_model(shared, own, c["rank"]))
        mine = ws.evaluate_indices(ws.client_test(c["client"]))
        assert final["clients"][c["client"]]["test_accuracy"] == pytest.approx(mine["test_accuracy"], abs=1e-9)
        # and the client saved that very model in peft's format beside its state: it loads on the pristine base
        reloaded = PeftModel.from_pretrained(load_base_model(cfg["model"]["name"], len(ws.label_names), seed=12345),
                                             summary["client_adapters"][str(c["client"])])
        assert evaluate(reloaded, ws.data, ws.client_test(c["client"]))[1] == pytest.approx(mine["test_accuracy"],
                                                                                             abs=1e-9)
    assert summary["client_adapters"] == {str(c): str(run_dir / "client_state" / str(c) / "adapter") for c in range(3)}
    assert not any(bool(v.any()) for k, v in shared.items() if lm.is_lora_b_key(k))  # the server never had a B
    assert summary["personalized"] is True and summary["final_test_accuracy"] == final["mean"]["test_accuracy"]
    assert "no global model" in log and "clients' own models, mean test accuracy" in log
    assert "saved by 3 of 3 clients where each keeps its state" in log


def test_hetlora_end_to_end_clients_prune_their_rank_and_send_only_what_they_kept(tmp_path: Path) -> None:
    from fedlora.core import lora_math as lm
    from fedlora.results.checkpoint import load_checkpoint

    # a strong regulariser (the published 0.01 prunes nothing this early): the tails shrink in round 2
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=hetlora", "strategy.reg_weight=1.0"])
    assert [sorted(c["rank"] for c in r["clients"]) for r in rows[1:2]] == [[2, 4, 8]]  # B = 0 at round 1's start
    lora_floats, head_floats = 768 * 12, 5 * 384 + 5  # (m + n) x modules; the classifier

    def sent(c: dict) -> int:
        return 4 * (c["rank"] * lora_floats + head_floats)

    pruned = 0
    for c in rows[2]["clients"]:
        planned = {r["client"]: r["rank"] for r in rows[1]["clients"]}[c["client"]]
        assert c["status"] == "ok" and c["rank"] in {planned, lm.pruned_rank(planned, 0.99, 2)}
        assert sent(c) <= c["bytes_up"] < sent(c) + 8000  # only the slots it kept went up (a slot: 36.9 kB)
        pruned += c["rank"] < planned
    assert pruned >= 1
    ranks = {k: int(v) for k, v in load_checkpoint(run_dir).strategy_state.items()}
    assert ranks == {f"rank/{c['client']}": c["rank"] for c in rows[2]["clients"]}  # round 3 would plan these
    assert rows[2]["strategy"]["mean_client_rank"] == pytest.approx(sum(c["rank"] for c in rows[2]["clients"]) / 3)
    assert reload_accuracy(run_dir) == pytest.approx(summary["final_test_accuracy"], abs=1e-9)
    assert "strategy HetLoRA" in log


def test_ffa_lora_end_to_end_a_never_travels_or_changes(tmp_path: Path) -> None:
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=ffa_lora"])
    _check_common(run_dir, summary, rows, log)
    check_golden("ffa_lora", run_dir)  # the golden file's case: the same command line (tests/golden)
    from safetensors.torch import load_file

    from fedlora.core.lora_math import init_lora_a

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    a_keys = [k for k in weights if "lora_A" in k]
    assert len(a_keys) == 12
    for key in a_keys:
        module = key.replace(".lora_A.weight", "")
        assert torch.equal(weights[key], init_lora_a(0, module, 8, 384)), "A must stay the shared seed's A"
    # only B (and the head) travel: a rank-8 client sends about half of what FedAvg's would
    rank8 = next(c for c in rows[1]["clients"] if c["rank"] == 8)
    full = 12 * 8 * (384 + 384) * 4
    assert 0.45 * full < rank8["bytes_up"] < 0.6 * full


def test_dp_sgd_end_to_end_with_ffa_lora_at_mixed_ranks(tmp_path: Path) -> None:
    # sample-level DP composes with FFA-LoRA's frozen A and with ranks 2/4/8 on Opacus' per-example gradients
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=ffa_lora", "privacy=dp_sgd", "privacy.target_epsilon=2"])
    _check_common(run_dir, summary, rows, log)
    assert "DP-SGD (Opacus, rdp accountant)" in log and "calibrated per client to epsilon 2 over 2 rounds" in log
    assert "Optimal order" not in log and "Full backward hook" not in log  # Opacus' benign warnings stay quiet
    for row in rows[1:]:
        spent = [c["epsilon"] for c in row["clients"]]
        assert len(spent) == 3 and row["dp_epsilon"] == max(spent)
    # every client trains in both rounds (fraction_train=1): each spends its whole budget, never more
    assert all(1.95 <= c["epsilon"] <= 2.0 for c in rows[2]["clients"])
    # and what the run recorded is what Opacus' own objects give, called here with its defaults: the noise
    # calibrated to epsilon 2 over 2 rounds of 2 steps at the client's rate, then its RDP accountant round by round
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    for client in rows[1]["clients"]:
        rate = min(1.0, 8 / client["num_examples"])  # TINY: batch 8, 2 local steps
        with warnings.catch_warnings():  # its search visits noise levels whose optimal order is its largest
            warnings.simplefilter("ignore", UserWarning)
            sigma = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=rate, steps=4,
                                         accountant="rdp", epsilon_tolerance=0.01)
        for r in (1, 2):
            accountant = RDPAccountant()
            accountant.history = [(sigma, rate, 2 * r)]
            recorded = next(c["epsilon"] for c in rows[r]["clients"] if c["client"] == client["client"])
            assert recorded == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9), (client, r)
    assert summary["dp_epsilon"] == rows[2]["dp_epsilon"] and summary["dp_delta"] == 1e-5
    assert summary["dp_level"] == "example"
    from safetensors.torch import load_file

    from fedlora.core.lora_math import init_lora_a

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for key in (k for k in weights if "lora_A" in k):
        assert torch.equal(weights[key], init_lora_a(0, key.replace(".lora_A.weight", ""), 8, 384))


def test_dp_fedavg_end_to_end_noises_the_sum_and_never_ffa_loras_a(tmp_path: Path) -> None:
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=ffa_lora", "privacy=dp_fedavg", "privacy.clip=0.5"])
    _check_common(run_dir, summary, rows, log)
    assert "client-level DP (DP-FedAvg)" in log and "every client weighing 1/3" in log
    for row in rows[1:]:
        assert row["strategy"]["dp_noise_std"] == pytest.approx(1.0 * 0.5 / 3)
        assert 0 <= row["strategy"]["dp_clipped_fraction"] <= 1 and row["strategy"]["dp_update_norm_median"] > 0
    assert 0 < rows[1]["dp_epsilon"] < rows[2]["dp_epsilon"] == summary["dp_epsilon"]
    assert summary["dp_level"] == "client"
    from safetensors.torch import load_file

    from fedlora.core.lora_math import init_lora_a

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for key in (k for k in weights if "lora_A" in k):  # the noise never touches the frozen A
        assert torch.equal(weights[key], init_lora_a(0, key.replace(".lora_A.weight", ""), 8, 384))


def test_lora_fair_end_to_end_never_worse_than_fedavg(tmp_path: Path) -> None:
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=lora_fair"])
    _check_common(run_dir, summary, rows, log)
    check_golden("lora_fair", run_dir)  # the golden file's case: the same command line (tests/golden)
    for row in rows[1:]:
        s = row["strategy"]
        # strictly closer to the ideal (the code keeps FedAvg's B when a correction would not help, so
        # "<=" would also pass with a broken correction), and a correction was applied
        assert s["fair_error_rel"] < s["fedavg_error_rel"] and s["delta_b_rel"] > 0


def test_compeft_composes_and_cuts_the_uplink(tmp_path: Path) -> None:
    run_dir, summary, rows, log = _run(tmp_path, ["strategy=flora", "compression=compeft"])
    _check_common(run_dir, summary, rows, log)
    check_golden("flora_compeft", run_dir)  # the golden file's case: the same command line (tests/golden)
    for client in rows[1]["clients"]:
        raw = 12 * client["rank"] * (384 + 384) * 4 + (5 * 384 + 5) * 4  # fp32 adapter + head
        assert client["bytes_up"] * 10 <= raw, (client, raw)


def test_centralized_upper_bound(tmp_path: Path) -> None:
    import dataclasses

    import yaml

    from fedlora.config.settings import Settings
    from fedlora.core import seeds
    from fedlora.runtime.training.local import train_steps
    from fedlora.runtime.training.workspace import Workspace
    from strategies.fedavg import FedAvg

    run_dir, summary, rows, log = _run(tmp_path, ["strategy=centralized"])
    check_golden("centralized", run_dir)  # the golden file's case: the same command line (tests/golden)
    assert [r["round"] for r in rows] == [0, 1, 2] and summary["bytes_up_total"] == 0
    assert "one learner at rank 8 on the 1781 pooled training examples, 6 steps per round" in log
    assert reload_accuracy(run_dir) == pytest.approx(summary["final_test_accuracy"], abs=1e-9)
    # The step budget, reproduced independently: round 1 is the rank-8 start trained for local_steps x
    # sampled clients = 2 x 3 steps on the pooled data; with any other budget the loss would differ.
    settings = Settings.from_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    ws = Workspace(settings.workspace_key())
    pooled = sorted(i for part in ws.partitions for i in part)
    ws.host.load_state(8, FedAvg().init(ws.host.spec(8), 0).adapter)
    budget = dataclasses.replace(settings.train, local_steps=6)
    loss = train_steps(ws.host.model, ws.host.set_trainable(8, True), ws.data, pooled, budget,
                       seeds.pooled_training(0, 1))
    assert rows[1]["train_loss"] == pytest.approx(loss, rel=1e-6)
    assert rows[1]["test_loss"] == pytest.approx(ws.evaluate(64)["test_loss"], rel=1e-6)
    assert rows[1]["clients"][0]["num_examples"] == len(pooled) == 1781


def test_sweep_and_report(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import FEDLORA, ROOT

    # two methods x two ComPEFT scales, each run holding a validation split; then the plain report and the
    # one that picks each method's scale on validation
    sweep = tmp_path / "sweep"
    out = subprocess.run([FEDLORA, "-m", *TINY, "num_rounds=1", "strategy=fedavg,ffa_lora", "compression=compeft",
                          "compression.alpha=1,4", "data.validation_fraction=0.1", f"hydra.sweep.dir={sweep}"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "summary.json").exists())
    assert len(jobs) == 4
    assert all("final_val_accuracy" in json.loads((job / "summary.json").read_text()) for job in jobs)
    reporter = str(Path(sys.executable).parent / "fedlora-report")
    report = subprocess.run([reporter, str(sweep)], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "fedavg" in report.stdout and "ffa_lora" in report.stdout
    assert (sweep / "report.md").exists() and (sweep / "report.png").stat().st_size > 10_000
    tuned = subprocess.run([reporter, str(sweep), "--tune", "compression.alpha", "--out", str(tmp_path / "tuned")],
                           capture_output=True, text=True, timeout=300)
    assert tuned.returncode == 0, tuned.stderr
    text = (tmp_path / "tuned" / "report.md").read_text()
    assert "4 of 4 jobs completed, 2 method(s)" in text and "## compression.alpha chosen on validation" in text
    assert text.count(" [compression.alpha=") == 2  # each method's row, at the value chosen
    assert "- fedavg+compeft(d=0.1): **" in text and "- ffa_lora+compeft(d=0.1): **" in text


def test_clients_that_come_and_go_with_fedau_weights_end_to_end(tmp_path: Path) -> None:
    from fedlora.core import participation as part

    probs = [1.0, 0.5, 0.3]
    run_dir = tmp_path / "run"
    out = run_fedlora([*TINY, "num_rounds=3", "strategy=flora", "participation=bernoulli",
                       f"participation.probabilities=[{','.join(map(str, probs))}]", "participation.fedau=true"],
                      run_dir)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    expected = {cid: p for cid, p in enumerate(probs)}
    for row in rows[1:]:  # who took part is the seeded draw, and FedAU's step is sum omega / N
        joined = part.participants(expected, row["round"], 0)
        assert [c["client"] for c in row["clients"]] == joined and row["num_ok"] == len(joined)
        assert row["strategy"]["fedau_step"] > 0 and row["strategy"]["fedau_weight_max"] >= 1
    assert rows[1]["strategy"]["fedau_weight_max"] == 1.0  # no interval recorded before round 1
    assert "participation: each client on its own" in log and "FedAU weights" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["base_merges"] == 3 and reload_accuracy(run_dir) == pytest.approx(summary["final_test_accuracy"],
                                                                                     abs=1e-9)
