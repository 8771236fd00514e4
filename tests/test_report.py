"""fedlora-report on hand-made run dirs: the numbers, the failed jobs, the files, the exit codes."""

from __future__ import annotations

import csv
import doctest
import json
import math
from pathlib import Path

import pytest
import yaml

from fedlora.core.metrics import PERPLEXITY
from fedlora.results import report

FEDAVG = "strategies.fedavg.FedAvg"
FLORA = "strategies.flora.FLoRA"
COMPEFT = {"_target_": "fedlora.compression.compeft.ComPEFT", "density": 0.1}


def make_run(run_dir: Path, target: str, seed: int, accs: list[float], up: int, down: int, *,
             compression: dict | None = None, failed_clients: dict[int, int] | None = None,
             privacy: dict | None = None, epsilon: float | None = None, downlink: dict | None = None) -> Path:
    """Write a fake completed run: two clients, ``up``/``down`` bytes per client and round."""
    run_dir.mkdir(parents=True)
    name = target.split(".")[1]
    config = {"name": name, "seed": seed, "strategy": {"_target_": target}, "compression": compression or {},
              "num_rounds": len(accs) - 1, "num_clients": 2, "output_dir": str(run_dir),
              **({"privacy": privacy} if privacy else {}), **({"downlink": downlink} if downlink else {})}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"round": 0, "test_accuracy": accs[0], "test_loss": 1.0, "train_loss": None, "wall_time": 1.0,
             "clients": []}]
    for rnd, acc in enumerate(accs[1:], start=1):
        n_failed = (failed_clients or {}).get(rnd, 0)
        clients = [{"client": c, "rank": 4, "bytes_down": down, "status": "ok", "bytes_up": up,
                    "num_examples": 10, "train_loss": 1.0, "train_seconds": 0.1} for c in range(2 - n_failed)]
        clients += [{"client": 9, "rank": 4, "bytes_down": down, "status": "failed", "error": "boom"}
                    for _ in range(n_failed)]
        rows.append({"round": rnd, "test_accuracy": acc, "test_loss": 1.0, "train_loss": 1.0,
                     "wall_time": 1.0 + 10 * rnd, "round_seconds": 10.0, "clients": clients,
                     "num_ok": 2 - n_failed, "num_failed": n_failed,
                     "bytes_down_total": 2 * down, "bytes_up_total": up * (2 - n_failed), "strategy": {}})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final_test_accuracy": accs[-1], "best_test_accuracy": max(accs),
               "wall_time_seconds": 100.0 + seed, "strategy": target.rsplit(".", 1)[1],
               "compression": "ComPEFT" if compression else None, "name": name,
               **({"dp_epsilon": epsilon, "dp_delta": 1e-5} if epsilon is not None else {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """fedavg and flora × seeds 0, 1; flora+compeft seed 0; a FAILED flora seed 2 and fedavg seed 2."""
    root = tmp_path / "sweep_2026-01-01_00-00-00"
    make_run(root / "0_fedavg_seed=0", FEDAVG, 0, [0.2, 0.5, 0.7, 0.8], up=1000, down=1500)
    make_run(root / "1_fedavg_seed=1", FEDAVG, 1, [0.2, 0.4, 0.6, 0.7], up=1000, down=1500)
    make_run(root / "2_flora_seed=0", FLORA, 0, [0.2, 0.6, 0.85, 0.9], up=2000, down=2000)
    make_run(root / "3_flora_seed=1", FLORA, 1, [0.2, 0.7, 0.8, 0.8], up=2000, down=2000,
             failed_clients={2: 1})
    make_run(root / "4_flora_seed=0,compression=compeft", FLORA, 0, [0.2, 0.3, 0.4, 0.5], up=200, down=2000,
             compression=COMPEFT)
    failed = root / "5_flora_seed=2"  # raised before round 0: config.yaml and FAILED only
    failed.mkdir()
    config = {"seed": 2, "strategy": {"_target_": FLORA}, "compression": {}}
    (failed / "config.yaml").write_text(yaml.safe_dump(config))
    (failed / "FAILED").write_text("Traceback (most recent call last):\n  File x\n"
                                   "RuntimeError: CUDA out of memory\n")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def by_method(rows: list[dict]) -> dict[str, dict]:
    return {row["method"]: row for row in rows}


def test_method_label() -> None:
    assert report.method_label({"strategy": {"_target_": FLORA}, "compression": {}}) == ("flora", "flora")
    assert report.method_label({"strategy": {"_target_": FLORA}, "compression": COMPEFT}) == (
        "flora", "flora+compeft(d=0.1)")
    fedau = {"strategy": {"_target_": FLORA}, "participation": {"model": "bernoulli", "fedau": True}}
    assert report.method_label(fedau) == ("flora", "flora+fedau")  # Bernoulli participation alone adds nothing
    scafcom = {"_target_": "fedlora.compression.scafcom.SCAFCOM", "density": 0.1, "drift_correction": True}
    fedavg = "strategies.fedavg.FedAvg"
    assert report.method_label({"strategy": {"_target_": fedavg}, "compression": scafcom})[1] == "fedavg+scafcom(d=0.1)"
    ef21 = {**scafcom, "drift_correction": False}  # compression=ef21: the same class without the correction
    assert report.method_label({"strategy": {"_target_": fedavg}, "compression": ef21})[1] == "fedavg+ef21(d=0.1)"
    scallion = {**scafcom, "codec": "rand_k", "density": 0.05}
    assert report.method_label({"strategy": {"_target_": fedavg}, "compression": scallion})[1] == (
        "fedavg+scallion(d=0.05)")


def test_load_runs_finds_jobs_and_marks_failed(sweep: Path) -> None:
    runs = report.load_runs(sweep)
    assert [r.path.name for r in runs] == sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert [r.status for r in runs] == ["ok"] * 5 + ["failed"]
    assert runs[-1].method == "flora" and runs[-1].seed == 2 and "CUDA out of memory" in runs[-1].error
    assert runs[4].method == "flora+compeft(d=0.1)" and runs[4].strategy == "flora"
    assert len(runs[0].rows) == 4 and runs[0].summary["final_test_accuracy"] == 0.8


def test_a_runs_checkpoint_is_not_another_run(sweep: Path) -> None:
    job = sweep / "0_fedavg_seed=0"
    (job / "checkpoint" / "round_00003").mkdir(parents=True)
    (job / "checkpoint" / "round_00003" / "metrics.jsonl").write_text((job / "metrics.jsonl").read_text())
    assert [r.path.name for r in report.load_runs(sweep)][:2] == ["0_fedavg_seed=0", "1_fedavg_seed=1"]
    assert [r.path for r in report.load_runs(job)] == [job]


def test_load_runs_accepts_a_single_run_dir(sweep: Path) -> None:
    runs = report.load_runs(sweep / "2_flora_seed=0")
    assert len(runs) == 1 and runs[0].ok and runs[0].method == "flora"


def test_summarize_numbers(sweep: Path) -> None:
    rows = by_method(report.summarize(report.load_runs(sweep)))
    assert list(rows) == ["fedavg", "flora", "flora+compeft(d=0.1)"]  # the failed job is not a row
    fedavg, flora, comp = rows["fedavg"], rows["flora"], rows["flora+compeft(d=0.1)"]
    assert fedavg["n_seeds"] == 2 and flora["n_seeds"] == 2 and comp["n_seeds"] == 1
    assert fedavg["final_acc_mean"] == pytest.approx(0.75)
    assert fedavg["final_acc_std"] == pytest.approx(math.sqrt(0.005))  # sample std of 0.8, 0.7
    assert flora["final_acc_mean"] == pytest.approx(0.85)
    assert flora["final_acc_std"] == pytest.approx(math.sqrt(0.005))
    assert comp["final_acc_std"] == 0.0  # one seed
    # the last 3 rounds (round 0 never counts): fedavg (0.5+0.7+0.8)/3 and (0.4+0.6+0.7)/3
    assert fedavg["tail_acc_mean"] == pytest.approx((2.0 / 3 + 1.7 / 3) / 2)
    assert fedavg["tail_acc_std"] == pytest.approx(math.sqrt(2) * 0.1 / 2)  # sample std of two values 0.1 apart
    assert comp["tail_acc_mean"] == pytest.approx(0.4) and comp["tail_acc_std"] == 0.0
    assert flora["best_acc_mean"] == pytest.approx(0.85)
    # target 0.9 * 0.85 = 0.765: flora reaches it at round 2 in both seeds, fedavg only seed 0 (round 3)
    assert flora["rounds_to_target"] == 2.0 and flora["seeds_reached_target"] == 2
    assert fedavg["rounds_to_target"] == 3.0 and fedavg["seeds_reached_target"] == 1
    assert comp["rounds_to_target"] == "never" and comp["seeds_reached_target"] == 0
    assert fedavg["up_bytes_per_round"] == 2000 and fedavg["down_bytes_per_round"] == 3000
    assert flora["up_bytes_per_round"] == pytest.approx((4000 * 3 + 4000 * 2 + 2000) / 6)  # one failed reply
    assert comp["up_bytes_per_round"] == 400 and comp["down_bytes_per_round"] == 4000
    assert comp["up_compression_ratio"] == pytest.approx(flora["up_bytes_per_round"] / 400)
    assert fedavg["up_compression_ratio"] is None and flora["up_compression_ratio"] is None
    # the uplink compressor leaves the downlink as it was: flora's 4000 B per round against flora's
    assert comp["down_compression_ratio"] == pytest.approx(flora["down_bytes_per_round"] / 4000)
    assert flora["down_compression_ratio"] is None
    assert fedavg["wall_time_s"] == pytest.approx(100.5)
    assert flora["failed_clients"] == 1 and fedavg["failed_clients"] == 0


def test_last_rounds_mean_skips_round_zero_and_unevaluated_rounds(tmp_path: Path) -> None:
    run = report.load_runs(make_run(tmp_path / "r", FEDAVG, 0, [0.9, 0.3, 0.5], up=1, down=1))[0]
    assert report.tail_value(run) == pytest.approx(0.4)  # two rounds after 0: both, the untrained 0.9 not
    assert report.tail_value(run, rounds=1) == pytest.approx(0.5)
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "r" / "metrics.jsonl").write_text(rows[0] + "\n")
    assert math.isnan(report.tail_value(report.load_runs(tmp_path / "r")[0]))


def test_paired_differences_take_each_seed_against_the_same_seed_of_the_reference(
        sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = report.load_runs(sweep)
    entries = {e["method"]: e for e in report.paired_differences(runs, "fedavg")}
    flora = entries["flora"]  # finals 0.9, 0.8 against FedAvg's 0.8, 0.7; last 3 rounds' means by hand
    assert flora["seeds"] == ["0", "1"] and flora["final"] == pytest.approx([0.1, 0.1]) and flora["better"] == 2
    by_hand = [(0.6 + 0.85 + 0.9 - 0.5 - 0.7 - 0.8) / 3, (0.7 + 0.8 + 0.8 - 0.4 - 0.6 - 0.7) / 3]
    assert flora["tail"] == pytest.approx(by_hand) and flora["tail_better"] == 2
    (compressed,) = [e for m, e in entries.items() if m.startswith("flora+compeft")]
    assert compressed["seeds"] == ["0"] and compressed["final"] == pytest.approx([-0.3]) and compressed["better"] == 0
    assert "fedavg" not in entries and not flora["personalized"]
    with pytest.raises(report.ChoiceError, match="--paired lora_fair: no completed run of that method; the methods"):
        report.paired_differences(runs, "lora_fair")
    report.main([str(sweep), "--paired", "fedavg"])
    text = (sweep / "report.md").read_text()
    assert "## Paired by seed against `fedavg`" in text and "--paired fedavg" in text
    assert ("| flora | 0, 1 | +0.100, +0.100 | +0.100 ± 0.000 | 2 of 2 | +0.117, +0.200 | +0.158 ± 0.059 | 2 of 2 |"
            in text)
    assert "| -0.300 | -0.300 | 0 of 1 | -0.267 | -0.267 | 0 of 1 |" in text  # one seed: no spread; 0.4 - 0.667
    with pytest.raises(SystemExit):
        report.main([str(sweep), "--paired", "nope"])
    assert "--paired nope: no completed run" in capsys.readouterr().err


def test_downlink_compression_is_its_own_method_with_its_own_ratio(tmp_path: Path) -> None:
    down = {"_target_": "fedlora.compression.compeft.ComPEFT", "density": 0.1}
    config = {"strategy": {"_target_": FEDAVG}, "downlink": down}
    assert report.method_label(config) == ("fedavg", "fedavg+down-compeft(d=0.1)")
    svd = {"strategy": {"_target_": FLORA}, "downlink": {"_target_": "fedlora.compression.merges.MergeSVD", "rank": 6}}
    assert report.method_label(svd) == ("flora", "flora+down-svd(q=6)")
    make_run(tmp_path / "0_fedavg", FEDAVG, 0, [0.5, 0.8], up=2000, down=3000)
    make_run(tmp_path / "1_fedavg_down", FEDAVG, 0, [0.5, 0.7], up=2000, down=250, downlink=down)
    rows = by_method(report.summarize(report.load_runs(tmp_path)))
    assert rows["fedavg+down-compeft(d=0.1)"]["down_compression_ratio"] == pytest.approx(12.0)
    assert rows["fedavg+down-compeft(d=0.1)"]["up_compression_ratio"] == pytest.approx(1.0)
    table = report.markdown_table(list(rows.values()))
    assert "| down compression |" in table and "| 12.0× |" in table


def test_compression_ratio_needs_the_baseline(sweep: Path) -> None:
    runs = [r for r in report.load_runs(sweep) if r.method != "flora"]
    rows = by_method(report.summarize(runs))
    assert rows["flora+compeft(d=0.1)"]["up_compression_ratio"] is None


def test_report_lists_failed_and_missing_jobs(sweep: Path) -> None:
    make_run(sweep / "6_fedavg_seed=3", FEDAVG, 3, [0.2, 0.3], up=1, down=1)
    (sweep / "6_fedavg_seed=3" / "summary.json").unlink()  # killed: metrics but no summary
    runs = report.load_runs(sweep)
    lines = "\n".join(report.problem_lines(runs, sweep))
    assert "**failed** `5_flora_seed=2` (flora, seed 2): RuntimeError: CUDA out of memory" in lines
    assert "**incomplete** `6_fedavg_seed=3`" in lines and "fedlora resume=" in lines
    assert "**missing** fedavg: no job for seed 2" in lines
    assert "**missing** flora+compeft(d=0.1): no job for seed 1, 2, 3" in lines


def test_main_writes_the_report(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| method | seeds | final acc |" in out and "| flora | 2 | 0.850 ± 0.071 |" in out
    text = (sweep / "report.md").read_text()
    assert "4.0 KB" in text and "3.7 KB" in text and "9.2×" in text and "3.0 (1/2 seeds)" in text
    assert "5_flora_seed=2" in text and f"`fedlora-report {sweep}`" in text
    with (sweep / "report.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["fedavg", "flora", "flora+compeft(d=0.1)"]
    assert float(table[0]["final_acc_mean"]) == pytest.approx(0.75) and table[2]["rounds_to_target"] == "never"
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "elsewhere"
    assert report.main([str(sweep / "2_flora_seed=0"), "--out", str(other)]) == 0
    assert {p.name for p in other.iterdir()} == {"report.md", "report.csv", "report.png"}


def test_several_folders_are_reported_together(sweep: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    later = tmp_path / "later"  # fedavg's seed 2, swept another day into another folder
    make_run(later / "0_fedavg_seed=2", FEDAVG, 2, [0.2, 0.5, 0.6, 0.9], up=1000, down=1500)
    runs = report.load_runs([sweep, later, sweep / "0_fedavg_seed=0"])  # a job given twice counts once
    assert len(runs) == 7 and sum(r.path.name == "0_fedavg_seed=0" for r in runs) == 1
    assert by_method(report.summarize(runs))["fedavg"]["n_seeds"] == 3
    out = tmp_path / "gathered"
    assert report.main([str(sweep), str(later), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert f"`fedlora-report {sweep} {later} --out {out}`" in text
    assert "| fedavg | 3 | 0.800 ± 0.100 |" in text
    assert "**failed** `sweep_2026-01-01_00-00-00/5_flora_seed=2`" in text  # named from the common parent
    assert "**missing** fedavg" not in text
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # two folders: no single default for where the report goes
        report.main([str(sweep), str(later)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


def test_several_relative_folders_name_their_relative_parent(sweep: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # a committed report's heading must read the same from any clone: relative folders, a relative parent
    make_run(tmp_path / "seeds" / "s2" / "0_fedavg_seed=2", FEDAVG, 2, [0.2, 0.5, 0.6, 0.9], up=1000, down=1500)
    make_run(tmp_path / "seeds" / "s3" / "0_fedavg_seed=3", FEDAVG, 3, [0.2, 0.5, 0.6, 0.8], up=1000, down=1500)
    monkeypatch.chdir(tmp_path)
    assert report.main(["seeds/s2", "./seeds/s3/", "--out", "out"]) == 0
    assert (tmp_path / "out" / "report.md").read_text().startswith("# fedlora report: `seeds`\n")
    assert report.common_parent([Path("a/b"), Path("c")]) == Path(".")
    assert report.common_parent([Path("seeds/s2"), tmp_path / "seeds" / "s3"]) == tmp_path / "seeds"  # mixed: resolved
    assert report.common_parent([tmp_path / "seeds" / "s2", tmp_path / "seeds" / "s3"]) == tmp_path / "seeds"


def test_main_exit_codes(tmp_path: Path, sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        report.main([str(empty)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "metrics.jsonl" in err
    with pytest.raises(SystemExit) as exc:
        report.main([str(tmp_path / "nope")])
    assert exc.value.code == 2
    only_failed = tmp_path / "only_failed"
    (only_failed / "0_x").mkdir(parents=True)
    (only_failed / "0_x" / "FAILED").write_text("ConfigError: bad\n")
    assert report.main([str(only_failed)]) == 1
    assert "**failed** `0_x`" in (only_failed / "report.md").read_text()


def test_import_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, fedlora.results.report; "
            "print(sorted({'torch', 'flwr', 'hydra', 'matplotlib'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


def make_causal_run(run_dir: Path, target: str, seed: int, ppls: list[float]) -> Path:
    """A fake completed causal-LM run (perplexity per round, lower is better)."""
    run_dir.mkdir(parents=True)
    name = target.split(".")[1]
    config = {"name": name, "seed": seed, "strategy": {"_target_": target}, "compression": {},
              "task": {"kind": "causal_lm"}, "num_rounds": len(ppls) - 1, "output_dir": str(run_dir)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    client = {"client": 0, "rank": 4, "status": "ok", "bytes_up": 100, "bytes_down": 100}
    rows = [{"round": r, "test_perplexity": p, "test_loss": math.log(p), "train_loss": None, "wall_time": 1.0,
             "clients": [client] if r else [], "bytes_up_total": 100 * (r > 0), "bytes_down_total": 100 * (r > 0)}
            for r, p in enumerate(ppls)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final_test_perplexity": ppls[-1], "best_test_perplexity": min(ppls),
               "final_test_loss": math.log(ppls[-1]), "primary_metric": "test_perplexity",
               "wall_time_seconds": 10.0, "name": name}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def test_causal_runs_are_reported_by_perplexity(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    make_causal_run(root / "0_fedavg", FEDAVG, 0, [900.0, 40.0, 20.0, 12.0])
    make_causal_run(root / "1_fedavg", FEDAVG, 1, [900.0, 50.0, 25.0, 14.0])
    make_causal_run(root / "2_flora", FLORA, 0, [900.0, 30.0, 13.0, 11.0])
    runs = report.load_runs(root)
    assert report.report_metric(runs).key == "test_perplexity"
    rows = by_method(report.summarize(runs))
    assert list(rows["fedavg"]) == report.columns(PERPLEXITY)
    assert rows["fedavg"]["up_bytes_per_round"] == 100
    assert rows["fedavg"]["final_ppl_mean"] == pytest.approx(13.0)
    assert rows["fedavg"]["final_ppl_std"] == pytest.approx(math.sqrt(2.0))
    assert rows["flora"]["best_ppl_mean"] == 11.0
    # target: the lowest final mean / 0.9 = 11 / 0.9 = 12.22 (lower is better)
    assert rows["flora"]["rounds_to_target"] == 3.0 and rows["flora"]["seeds_reached_target"] == 1
    # fedavg seed 1 ends at 14 > 12.22: one seed of two reaches the target
    assert rows["fedavg"]["rounds_to_target"] == 3.0 and rows["fedavg"]["seeds_reached_target"] == 1
    assert report.main([str(root)]) == 0
    text = (root / "report.md").read_text()
    assert "| method | seeds | final ppl | last 3 rounds' ppl | best ppl | rounds to best / 0.9 |" in text
    assert "| flora | 1 | 11.000 ± 0.000 | 18.000 ± 0.000 | 11.000 | 3.0 |" in text and "11.000 / 0.9 = 12.222" in text
    with (root / "report.csv").open() as f:
        assert next(csv.reader(f))[2:7] == ["final_ppl_mean", "final_ppl_std", "tail_ppl_mean", "tail_ppl_std",
                                            "best_ppl_mean"]


def test_mixed_tasks_are_flagged(sweep: Path) -> None:
    make_causal_run(sweep / "9_flora_causal", FLORA, 0, [900.0, 11.0])
    lines = "\n".join(report.problem_lines(report.load_runs(sweep), sweep))
    assert "different tasks (test accuracy, test perplexity)" in lines


def test_an_incomplete_deployed_run_is_not_offered_resume(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "deployed", FEDAVG, 0, [0.2, 0.3], up=1, down=1)
    (run_dir / "summary.json").unlink()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "deployment": {"federation": "fedlora"}}))
    run = report.load_run(run_dir)
    assert run.status == "incomplete" and "a deployed run cannot be resumed" in run.error
    assert "fedlora resume" not in run.error


def test_cost_to_target_and_quality_under_a_budget(sweep: Path) -> None:
    # per round: fedavg 2 x 1000 up + 2 x 1500 down = 5000; flora 4000 + 4000 = 8000 (seed 1 round 2: one
    # failed reply, 2000 up); compeft 400 + 4000 = 4400. Whole runs: fedavg 15000, flora 24000 / 22000,
    # compeft 13200 -> the default budget is the cheapest method's, 13200 bytes.
    rows = by_method(report.summarize(report.load_runs(sweep)))
    fedavg, flora, comp = rows["fedavg"], rows["flora"], rows["flora+compeft(d=0.1)"]
    assert {r["budget_bytes"] for r in rows.values()} == {13200.0}
    assert all(r["target"] == pytest.approx(0.9 * 0.85) for r in rows.values())
    # target 0.765: flora at round 2 (seed 0: 8000 up, 8000 down; seed 1: 6000 up, 8000 down), fedavg seed 0 at 3
    assert flora["up_bytes_to_target"] == 7000 and flora["down_bytes_to_target"] == 8000
    assert fedavg["up_bytes_to_target"] == 6000 and fedavg["down_bytes_to_target"] == 9000
    assert math.isnan(comp["up_bytes_to_target"])
    # within 13200 bytes: fedavg 2 rounds (0.7, 0.6), flora 1 round (0.6, 0.7; seed 1 needs 14000 for 2), compeft 3
    assert fedavg["acc_at_budget_mean"] == pytest.approx(0.65) and fedavg["rounds_in_budget"] == 2.0
    assert flora["acc_at_budget_mean"] == pytest.approx(0.65) and flora["rounds_in_budget"] == 1.0
    assert comp["acc_at_budget_mean"] == pytest.approx(0.5) and comp["rounds_in_budget"] == 3.0
    # given values: a budget below one round keeps every method at round 0; target 0.6
    given = by_method(report.summarize(report.load_runs(sweep), target=0.6, budget=4000))
    assert given["fedavg"]["acc_at_budget_mean"] == pytest.approx(0.2) and given["fedavg"]["rounds_in_budget"] == 0
    assert given["fedavg"]["rounds_to_target"] == 2.0 and given["fedavg"]["up_bytes_to_target"] == 4000
    assert given["flora"]["rounds_to_target"] == 1.0 and given["fedavg"]["target"] == 0.6


def test_main_takes_a_target_and_a_budget(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(sweep), "--target", "0.6", "--budget-mb", "0.01"]) == 0
    text = (sweep / "report.md").read_text()
    assert "| rounds to 0.600 | bytes to target (up / down) | acc at budget (rounds) |" in text
    assert "within 10.0 KB (given)" in text and "--target 0.6 --budget-mb 0.01" in text
    assert "| fedavg | 2 | 0.750 ± 0.071 | 0.617 ± 0.071 | 0.750 | 2.0 | 4.0 KB / 6.0 KB | 0.650 (2.0) |" in text
    for bad, field in ((["--budget-mb", "0"], "--budget-mb=0.0"), (["--target", "nan"], "--target=nan")):
        with pytest.raises(SystemExit) as exc:
            report.main([str(sweep), *bad])
        assert exc.value.code == 2 and field in capsys.readouterr().err


def test_private_runs_are_their_own_methods_with_the_epsilon_they_spent(tmp_path: Path) -> None:
    root = tmp_path / "privacy"
    dp = {"kind": "dp_sgd", "target_epsilon": 3, "clip": 1.0}
    for seed, eps in ((0, 2.99), (1, 2.97)):
        make_run(root / f"{seed}_fedavg_eps3", FEDAVG, seed, [0.2, 0.4, 0.5], up=1000, down=1000, privacy=dp,
                 epsilon=eps)
        make_run(root / f"{seed}_fedavg_epsinf", FEDAVG, seed, [0.2, 0.6, 0.8], up=1000, down=1000,
                 privacy={**dp, "target_epsilon": float("inf")})
    runs = report.load_runs(root)
    rows = by_method(report.summarize(runs))
    assert set(rows) == {"fedavg", "fedavg+dp_sgd(eps=3)"}
    assert rows["fedavg+dp_sgd(eps=3)"]["epsilon"] == pytest.approx(2.98) and math.isnan(rows["fedavg"]["epsilon"])
    table = report.markdown_table(report.summarize(runs))
    assert table.splitlines()[0].endswith("| epsilon |")
    assert "| 2.98 |" in table and "∞ (no DP) |" in table
    plain = report.markdown_table(report.summarize([r for r in runs if "inf" in r.path.name]))
    assert "epsilon" not in plain


def test_private_runs_are_drawn_against_the_epsilon_they_spent(tmp_path: Path, sweep: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "privacy"
    dp = {"kind": "dp_sgd", "target_epsilon": 3, "clip": 1.0}
    for seed, eps, acc in ((0, 2.99, 0.5), (1, 2.97, 0.3)):
        make_run(root / f"{seed}_fedavg_eps3", FEDAVG, seed, [0.2, 0.4, acc], up=1000, down=1000, privacy=dp,
                 epsilon=eps)
        make_run(root / f"{seed}_fedavg_epsinf", FEDAVG, seed, [0.2, 0.6, 0.8 + seed / 10], up=1000, down=1000,
                 privacy={**dp, "target_epsilon": float("inf")})
    make_run(root / "0_fedavg_eps1", FEDAVG, 0, [0.2, 0.3, 0.25], up=1000, down=1000,
             privacy={**dp, "target_epsilon": 1}, epsilon=1.0)
    make_run(root / "0_flora", FLORA, 0, [0.2, 0.5, 0.7], up=1000, down=1000)  # never private: not drawn
    make_run(root / "0_fedavg_eps2", FEDAVG, 0, [0.2, 0.3, 0.3], up=1000, down=1000,  # no epsilon recorded:
             privacy={**dp, "target_epsilon": 2})                                     # not drawn (nor as no DP)
    points = report.privacy_points(report.load_runs(root))
    assert list(points) == ["fedavg"]
    got = [(p["method"], p["epsilon"], p["values"]) for p in points["fedavg"]]
    assert got == [("fedavg+dp_sgd(eps=1)", 1.0, [0.25]), ("fedavg+dp_sgd(eps=3)", pytest.approx(2.98), [0.5, 0.3]),
                   ("fedavg", math.inf, [0.8, 0.9])]
    assert points["fedavg"][1]["mean"] == pytest.approx(0.4)
    assert points["fedavg"][1]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert report.main([str(root)]) == 0
    assert (root / "privacy.png").stat().st_size > 0
    assert "`privacy.png`" in (root / "report.md").read_text()
    assert str(root / "privacy.png") in capsys.readouterr().out
    assert report.main([str(sweep)]) == 0  # nothing private: no plot, no line
    assert not (sweep / "privacy.png").exists() and "privacy.png" not in (sweep / "report.md").read_text()
    stale = tmp_path / "out"  # a report without private runs into a folder where one drew the plot
    assert report.main([str(root), "--out", str(stale)]) == 0 and (stale / "privacy.png").is_file()
    assert report.main([str(sweep), "--out", str(stale)]) == 0
    assert not (stale / "privacy.png").exists()


def _with_validation(run_dir: Path, vals: list[float]) -> Path:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row, val in zip(rows, vals, strict=True):
        row["val_accuracy"] = val
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_tune_reports_the_test_accuracy_of_the_value_chosen_on_validation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "sweep"
    for seed in (0, 1):
        make_run(root / f"base{seed}", FEDAVG, seed, [0.2, 0.9], up=1000, down=1500)
        # alpha 1: the better test accuracy, the worse validation; alpha 2 must be chosen
        _with_validation(make_run(root / f"a1_{seed}", FEDAVG, seed, [0.2, 0.9 - seed / 100], up=100, down=1500,
                                  compression={**COMPEFT, "alpha": 1.0}), [0.2, 0.6])
        _with_validation(make_run(root / f"a2_{seed}", FEDAVG, seed, [0.2, 0.7 + seed / 10], up=100, down=1500,
                                  compression={**COMPEFT, "alpha": 2.0}), [0.2, 0.8 - seed / 10])
    runs = report.load_runs(root)
    kept, choices = report.choose_on_validation(runs, "compression.alpha")
    assert [c["chosen"] for c in choices] == ["2"]
    assert choices[0]["candidates"] == {"1": (pytest.approx(0.6), 2), "2": (pytest.approx(0.75), 2)}
    rows = by_method(report.summarize(kept))
    chosen = rows["fedavg+compeft(d=0.1) [compression.alpha=2]"]
    assert chosen["n_seeds"] == 2 and chosen["final_acc_mean"] == pytest.approx(0.75)  # not alpha 1's 0.895
    assert rows["fedavg"]["n_seeds"] == 2 and chosen["up_compression_ratio"] == pytest.approx(10.0)
    assert report.main([str(root), "--tune", "compression.alpha"]) == 0
    text = (root / "report.md").read_text()
    assert "## compression.alpha chosen on validation" in text and "**2** among 1: 0.6000 (2 seeds)" in text
    assert "--tune compression.alpha" in text and "6 of 6 jobs completed, 2 method(s)" in text


def test_tune_chooses_among_values_that_the_method_label_shows(tmp_path: Path) -> None:
    # the label carries the density (+down-compeft(d=0.1)), and still the densities are one method's candidates
    down = {"_target_": "fedlora.compression.compeft.ComPEFT"}
    _with_validation(make_run(tmp_path / "d01", FEDAVG, 0, [0.2, 0.85], up=1000, down=50,
                              downlink={**down, "density": 0.1}), [0.2, 0.83])
    _with_validation(make_run(tmp_path / "d05", FEDAVG, 0, [0.2, 0.89], up=1000, down=130,
                              downlink={**down, "density": 0.5}), [0.2, 0.87])
    kept, choices = report.choose_on_validation(report.load_runs(tmp_path), "downlink.density")
    assert [(c["method"], c["chosen"]) for c in choices] == [("fedavg+down-compeft", "0.5")]
    assert [r.method for r in kept] == ["fedavg+down-compeft [downlink.density=0.5]"]
    # a tie on validation accuracy goes to the lower validation loss
    for name, loss in (("d01", 0.4), ("d05", 0.5)):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        rows[-1].update(val_accuracy=0.87, val_loss=loss)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, choices = report.choose_on_validation(report.load_runs(tmp_path), "downlink.density")
    assert choices[0]["chosen"] == "0.1"
    (line,) = [x for x in report.choices_markdown("downlink.density", choices) if x.startswith("- ")]
    assert "**0.1** among " in line and "0.1: 0.8700 [val loss 0.4000] (1 seed)" in line
    assert "0.5: 0.8700 [val loss 0.5000] (1 seed)" in line


def test_tune_needs_validation_metrics_and_a_key_the_sweep_sets(
        sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(report.ChoiceError, match="data.validation_fraction=0.1"):
        report.choose_on_validation(report.load_runs(sweep), "compression.density")
    with pytest.raises(report.ChoiceError, match="no completed run sets compression.alpha"):
        report.choose_on_validation(report.load_runs(sweep), "compression.alpha")
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(sweep), "--tune", "compression.density"])
    assert exit_info.value.code == 2 and "has no val_accuracy" in capsys.readouterr().err


def test_every_metric_has_one_validation_name() -> None:
    from fedlora.core.metrics import ACCURACY, validation_key

    assert ACCURACY.validation == validation_key("test_accuracy") == "val_accuracy"
    assert PERPLEXITY.validation == "val_perplexity" and validation_key("test_loss") == "val_loss"


def _with_client_eval(run_dir: Path, accs: list[float]) -> Path:
    """Add a per-client evaluation (clients 0, 1 with ``accs``) to the last round of a made run."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [{"client": c, "bytes_down": 5, "num_examples": 4, "test_accuracy": a} for c, a in enumerate(accs)]
    rows[-1]["client_eval"] = {"clients": clients, "mean": {"test_accuracy": sum(accs) / len(accs)},
                               "worst": min(accs), "worst_client": accs.index(min(accs)), "eval_seconds": 0.1}
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_per_client_mean_and_worst_are_reported_over_seeds(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    _with_client_eval(make_run(root / "0_fedavg_seed=0", FEDAVG, 0, [0.2, 0.8], up=10, down=10), [0.9, 0.5])
    _with_client_eval(make_run(root / "1_fedavg_seed=1", FEDAVG, 1, [0.2, 0.8], up=10, down=10), [0.8, 0.6])
    make_run(root / "2_flora_seed=0", FLORA, 0, [0.2, 0.8], up=10, down=10)  # its clients did not evaluate
    rows = by_method(report.summarize(report.load_runs(root)))
    assert rows["fedavg"]["client_acc_mean"] == pytest.approx((0.7 + 0.7) / 2)
    assert rows["fedavg"]["client_acc_worst"] == pytest.approx((0.5 + 0.6) / 2)
    assert math.isnan(rows["flora"]["client_acc_mean"]) and math.isnan(rows["flora"]["client_acc_worst"])
    table = report.markdown_table(list(rows.values())).splitlines()
    assert table[0].startswith("| method | seeds | final acc | last 3 rounds' acc | best acc | clients' mean acc "
                               "| worst client acc |")
    assert "| 0.700 | 0.550 |" in table[2] and "| n/a | n/a |" in table[3]
    plain = report.markdown_table([rows["flora"]])  # nobody evaluated per client: no such columns
    assert "worst client" not in plain


def test_a_personalized_methods_accuracy_is_marked_as_the_clients_mean(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    run = make_run(root / "0_fedsa_lora_seed=0", "strategies.fedsa_lora.FedSALoRA", 0, [0.2, 0.8], up=10, down=10)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "personalized": True}))
    make_run(root / "1_fedavg_seed=0", FEDAVG, 0, [0.2, 0.7], up=20, down=20)
    rows = by_method(report.summarize(report.load_runs(root)))
    assert rows["fedsa_lora"]["personalized"] is True and rows["fedavg"]["personalized"] is False
    table = report.markdown_table(list(rows.values()))
    assert "| fedsa_lora | 1 | 0.800 ± 0.000 † |" in table and "| fedavg | 1 | 0.700 ± 0.000 |" in table
    assert "† no global model" in table
    assert "†" not in report.markdown_table([rows["fedavg"]])


def test_runs_whose_method_settings_differ_are_different_methods(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for seed in (0, 1):
        for alpha in (1.0, 4.0):
            make_run(root / f"{seed}_a{alpha}", FEDAVG, seed, [0.2, 0.5 + alpha / 100], up=100, down=1000,
                     compression={**COMPEFT, "alpha": alpha})
    old = make_run(root / "2_old", FEDAVG, 2, [0.2, 0.5], up=100, down=1000, compression=COMPEFT)  # no alpha key
    runs = report.load_runs(root)
    methods = {r.path.name: r.method for r in runs}
    assert methods["0_a1.0"] == methods["1_a1.0"] == "fedavg+compeft(d=0.1) [compression.alpha=1]"
    assert methods["0_a4.0"] == methods["1_a4.0"] == "fedavg+compeft(d=0.1) [compression.alpha=4]"
    assert methods[old.name] == "fedavg+compeft(d=0.1)"  # a key it lacks is not a difference
    rows = by_method(report.summarize(runs))
    assert rows["fedavg+compeft(d=0.1) [compression.alpha=4]"]["n_seeds"] == 2
    assert rows["fedavg+compeft(d=0.1) [compression.alpha=4]"]["final_acc_mean"] == pytest.approx(0.54)
    # a difference outside the method's settings stays one method, and is noted
    other = tmp_path / "other"
    make_run(other / "0", FEDAVG, 0, [0.2, 0.5], up=100, down=1000)
    make_run(other / "1", FEDAVG, 1, [0.2, 0.5, 0.6], up=100, down=1000)
    runs = report.load_runs(other)
    assert {r.method for r in runs} == {"fedavg"}
    assert any("differ in: num_rounds" in line for line in report.problem_lines(runs, other))


def test_the_examples_in_the_docstrings_hold() -> None:
    """The labels, the settings split and the privacy points are documented by examples: run them."""
    result = doctest.testmod(report)
    assert result.attempted >= 10 and result.failed == 0


def test_plot_styles_tell_forty_methods_apart_and_keep_the_first_ten() -> None:
    styles = [report.plot_style(i) for i in range(40)]
    assert len(set(styles)) == 40
    assert styles[:10] == [(f"C{i}", "-", "o") for i in range(10)]  # the plots of up to ten methods are as before
    assert styles[10] == ("C0", "--", "s") and styles[10][0] == styles[0][0]


def test_a_plot_of_many_methods_has_one_legend_under_both_panels(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415 - the report imports it lazily too

    runs_dir = tmp_path / "many"
    for i in range(12):  # twelve methods: ComPEFT at twelve densities
        make_run(runs_dir / f"{i}_fedavg", FEDAVG, 0, [0.2, 0.5 + i / 100], up=100 + i, down=1000,
                 compression={**COMPEFT, "density": round(0.05 * (i + 1), 2)})
    drawn: list[plt.Figure] = []
    original = plt.Figure.savefig

    def keep(fig: plt.Figure, *args: object, **kwargs: object) -> None:
        drawn.append(fig)
        original(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    report.plot_report(report.load_runs([runs_dir]), tmp_path / "report.png", budget=2000.0)
    (fig,) = drawn
    assert len(fig.legends) == 1 and len(fig.legends[0].get_texts()) == 12
    ax_r, ax_b = fig.axes
    assert ax_r.get_legend() is None
    assert [t.get_text() for t in ax_b.get_legend().get_texts()] == ["budget 2.0 KB"]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
