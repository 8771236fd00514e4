"""downlink=svd (fedlora.compression.merges): FLoRA's base merges truncated by their SVD, the rest carried.

The math against an independent SVD (NumPy's) on tiny shapes: the truncation is the Eckart-Young best
rank-q approximation, what is sent plus what is carried equals the merge plus the last residual, and over
rounds nothing is lost but the final residual. Then whole in-process federations with FLoRA through the
real loop, wire codec and client side: every client trains on exactly the server's truncated merges, a
large enough rank is FLoRA uncompressed, the downlink shrinks by R/q, the residual is checkpointed and a
resumed run equals the uninterrupted one; and the configurations it cannot serve, refused before anything
starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import compose, jsonl_rows, untimed
from federation_kit import TinyModel, TinyTrainer

from fedlora.compression.merges import MergeSVD
from fedlora.config.validate import validate
from fedlora.core import lora_math as lm
from fedlora.core.errors import ConfigError, RunError
from fedlora.core.types import LoraPair
from fedlora.federation import wire
from fedlora.federation.client import ClientSide
from fedlora.federation.loop import Federation, LoopSettings
from fedlora.federation.memory import InMemoryTransport
from fedlora.results import checkpoint as ckpt
from fedlora.results.record import read_records
from fedlora.results.recorder import RunRecorder
from strategies.fedavg import FedAvg
from strategies.flora import FLoRA

RANKS = {0: 2, 1: 4, 2: 8, 3: 4}


def pair(m: int, n: int, r: int, seed: int) -> LoraPair:
    gen = torch.Generator().manual_seed(seed)
    return LoraPair(a=torch.randn(r, n, generator=gen, dtype=torch.float64),
                    b=torch.randn(m, r, generator=gen, dtype=torch.float64))


# -- the math ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "n", "r", "q"), [(6, 5, 4, 2), (5, 7, 3, 1), (4, 4, 2, 3), (8, 3, 6, 3)])
def test_the_truncation_is_the_best_rank_q_approximation_and_the_residual_holds_the_rest(m, n, r, q) -> None:
    p = pair(m, n, r, seed=m * 100 + n)
    residual = 0.1 * torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sent, carried, kept_sq, total_sq = lm.truncate_merge(p, residual, q)
    target = (p.b @ p.a + residual).numpy()
    s = np.linalg.svd(target, compute_uv=False)  # an independent SVD
    qq = min(q, int((s > 1e-12).sum()))
    assert sent.a.shape == (qq, n) and sent.b.shape == (m, qq)
    approx = (sent.b @ sent.a).numpy()
    # Eckart-Young: the error of the best rank-q approximation is the tail of the spectrum
    np.testing.assert_allclose(np.linalg.norm(target - approx) ** 2, (s[qq:] ** 2).sum(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(approx + carried.numpy(), target, rtol=0, atol=1e-12)  # nothing dropped
    assert kept_sq == pytest.approx((s[:qq] ** 2).sum(), rel=1e-9) and total_sq == pytest.approx((s**2).sum())


def test_over_rounds_the_sent_merges_and_the_last_residual_add_up_to_the_merges() -> None:
    comp = MergeSVD(rank=2)
    residual: dict[str, torch.Tensor] = {}
    total = {"l1": torch.zeros(6, 5, dtype=torch.float64), "l2": torch.zeros(3, 4, dtype=torch.float64)}
    applied = {k: torch.zeros_like(v) for k, v in total.items()}
    for t in range(5):
        merge = {"l1": pair(6, 5, 4, seed=t), "l2": pair(3, 4, 3, seed=50 + t)}
        sent, residual, metrics = comp.compress_merge(merge, residual)
        for k in total:
            total[k] += merge[k].b @ merge[k].a
            applied[k] += sent[k].b @ sent[k].a
            assert sent[k].a.shape[0] == 2
        assert 0 < metrics["merge_energy_kept"] < 1 and metrics["merge_rank_sent"] == 2
        rest = sum(float(e.square().sum()) for e in residual.values()) ** 0.5
        assert metrics["merge_residual_fro"] == pytest.approx(rest)
    for k in total:
        torch.testing.assert_close(applied[k] + residual[k], total[k], rtol=0, atol=1e-10)


def test_a_rank_that_covers_the_merge_sends_it_exactly_and_carries_nothing() -> None:
    p = pair(6, 5, 3, seed=4)
    sent, carried, kept_sq, total_sq = lm.truncate_merge(p, None, 5)
    assert sent.a.shape[0] == 3  # the merge's own rank: no zero components sent
    torch.testing.assert_close(sent.b @ sent.a, p.b @ p.a, rtol=0, atol=1e-12)
    assert float(carried.abs().max()) < 1e-12 and kept_sq == pytest.approx(total_sq)
    single = LoraPair(a=p.a.float(), b=p.b.float())  # a float32 merge stays float32; the residual is float64
    out, res, _, _ = lm.truncate_merge(single, None, 2)
    assert out.a.dtype == out.b.dtype == torch.float32 and res.dtype == torch.float64


@pytest.mark.parametrize("rank", [0, -1, 1.5, True, "2"])
def test_a_bad_rank_is_named(rank: Any) -> None:
    with pytest.raises(ValueError, match=r"downlink.rank=.* must be an integer >= 1"):
        MergeSVD(rank=rank)


# -- whole federations ---------------------------------------------------------------------------------
class Recording(TinyTrainer):
    """Keeps the base merges each client trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.bases: dict[tuple[int, int], list[Any]] = {}

    def train(self, client_id: int, assignment: wire.Assignment, merges: Any) -> Any:
        self.bases[(assignment.server_round, client_id)] = [{k: (p.a.clone(), p.b.clone()) for k, p in m.items()}
                                                            for m in merges]
        return super().train(client_id, assignment, merges)


def federation(run_dir: Path, downlink: Any, *, transport: InMemoryTransport | None = None,
               trainer: TinyTrainer | None = None, **loop: Any) -> tuple[Federation, InMemoryTransport]:
    settings = LoopSettings(**{"name": "t", "seed": 0, "num_clients": len(RANKS), "num_rounds": 5,
                               "round_timeout": 30.0, **loop})
    transport = transport or InMemoryTransport(RANKS, ClientSide(trainer=trainer or Recording()))
    fed = Federation(settings, strategy=FLoRA(), transport=transport, model=TinyModel(run_dir), run_dir=run_dir,
                     recorder=RunRecorder(run_dir, tensorboard=False), say=lambda _: None, downlink=downlink)
    return fed, transport


def test_every_client_trains_on_the_servers_truncated_merges_under_partial_participation(tmp_path: Path) -> None:
    trainer = Recording()
    fed, _ = federation(tmp_path / "svd", MergeSVD(rank=2), trainer=trainer, fraction_train=0.5, num_rounds=6)
    fed.run()
    merges = ckpt.load_checkpoint(tmp_path / "svd").merges
    assert len(merges) == 6 and all(p.a.shape[0] <= 2 for m in merges for p in m.values())
    assert len(trainer.bases) == 12
    for (server_round, _), base in trainer.bases.items():  # bit for bit, every merge made before its round
        assert len(base) == server_round - 1
        for mine, theirs in zip(base, merges, strict=False):
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[k][0], theirs[k].a) and torch.equal(mine[k][1], theirs[k].b) for k in mine)
    records = read_records(tmp_path / "svd")
    kept = [r.strategy["merge_energy_kept"] for r in records[1:]]
    assert all(0 < k < 1 for k in kept)  # clients of ranks 2..8 stack rank 6..12: truncating to 2 drops some
    plain, _ = federation(tmp_path / "plain", None, fraction_train=0.5, num_rounds=6)
    plain.run()
    down = [{(r.round, c.client): c.bytes_down for r in read_records(d)[1:] for c in r.clients}
            for d in (tmp_path / "svd", tmp_path / "plain")]
    assert down[0].keys() == down[1].keys() and all(down[0][k] < down[1][k] for k in down[0] if k[0] > 1)


def test_a_rank_that_covers_every_merge_is_flora_uncompressed(tmp_path: Path) -> None:
    plain, _ = federation(tmp_path / "plain", None)
    plain.run()
    full, _ = federation(tmp_path / "full", MergeSVD(rank=64))  # >= 2 + 4 + 8 + 4
    full.run()
    for r, s in zip(read_records(tmp_path / "plain"), read_records(tmp_path / "full"), strict=True):
        assert r.metrics["test_accuracy"] == pytest.approx(s.metrics["test_accuracy"], rel=1e-6)
        assert r.metrics["test_loss"] == pytest.approx(s.metrics["test_loss"], rel=1e-6)
    assert read_records(tmp_path / "full")[-1].strategy["merge_energy_kept"] == pytest.approx(1.0)


def test_resumed_from_a_checkpoint_equals_uninterrupted(tmp_path: Path) -> None:
    straight, _ = federation(tmp_path / "straight", MergeSVD(rank=2), fraction_train=0.5)
    straight.run()
    killed = tmp_path / "killed"
    first, transport = federation(killed, MergeSVD(rank=2), fraction_train=0.5, num_rounds=3)
    first.run()
    saved = ckpt.load_checkpoint(killed)
    assert saved.merge_residual and all(float(e.abs().max()) > 0 for e in saved.merge_residual.values())
    (killed / "summary.json").unlink()
    resumed, _ = federation(killed, MergeSVD(rank=2), fraction_train=0.5, transport=transport, resume=True)
    resumed.run()
    rows, reference = untimed(jsonl_rows(killed)), untimed(jsonl_rows(tmp_path / "straight"))
    # a client's first round after a resume resends it every merge (the server forgot which it holds): more bytes
    # down; the merges, and so everything else, are the same
    for row in rows[4:] + reference[4:]:
        row.pop("bytes_down_total")
        for client in row["clients"]:
            client.pop("bytes_down")
    assert rows == reference
    a, b = ckpt.load_checkpoint(killed), ckpt.load_checkpoint(tmp_path / "straight")
    for key in a.merge_residual:
        assert torch.equal(a.merge_residual[key], b.merge_residual[key])
    assert len(a.merges) == len(b.merges) == 5
    assert all(torch.equal(x[k].a, y[k].a) and torch.equal(x[k].b, y[k].b)
               for x, y in zip(a.merges, b.merges, strict=True) for k in x)


# -- what it refuses before anything starts ------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field", "fix"), [
    (["strategy=fedavg"], "downlink='svd'", "use downlink=compeft"),
    (["strategy=lora_fair"], "downlink='svd'", "use downlink=compeft"),
    (["strategy=centralized"], "downlink='svd'", "use downlink=none with strategy=centralized"),
    (["strategy=flora", "downlink.rank=0"], "downlink", "downlink.rank=0 must be an integer >= 1"),
    (["strategy=flora", "downlink.rank=0"], "downlink", "use downlink.rank=6"),
])
def test_what_it_cannot_serve_is_refused_before_anything_starts(overrides: list[str], field: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(["downlink=svd", *overrides]), check_model=False, check_data=False)
    assert field in str(info.value) and fix in str(info.value), str(info.value)


def test_the_loop_refuses_it_for_a_strategy_that_merges_nothing(tmp_path: Path) -> None:
    # a caller who builds the federation without the configuration check gets the same reason and fix
    settings = LoopSettings(name="t", seed=0, num_clients=len(RANKS), num_rounds=1, round_timeout=30.0)
    with pytest.raises(RunError, match=r"FedAvg's clients continue from the global adapter; use downlink=compeft"):
        Federation(settings, strategy=FedAvg(), transport=InMemoryTransport(RANKS, ClientSide(trainer=TinyTrainer())),
                   model=TinyModel(tmp_path), run_dir=tmp_path, recorder=RunRecorder(tmp_path, tensorboard=False),
                   say=lambda _: None, downlink=MergeSVD())


def test_flora_is_accepted_with_and_without_uplink_compression() -> None:
    for extra in ([], ["compression=compeft"]):
        validate(compose(["strategy=flora", "downlink=svd", *extra]), check_model=False, check_data=False)


@pytest.mark.slow
def test_end_to_end_with_the_real_model_on_flower(tmp_path: Path) -> None:
    # Real MiniLM, real Flower apps on Ray, FLoRA with 3 clients of ranks 2/4/8 (a merge of rank 14) truncated
    # to rank 4: each merge sent is a rank-4 pair, the downlink is smaller than FLoRA's own, and the adapter
    # saved with the truncated merges folded in reloads with plain peft to the accuracy the run reported.
    import json

    from conftest import TINY, reload_accuracy, run_fedlora

    rows = {}
    for name, extra in (("svd", ["downlink=svd", "downlink.rank=4"]), ("plain", [])):
        out = run_fedlora([*TINY, "strategy=flora", "num_rounds=3", *extra], tmp_path / name)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        if name == "svd":
            assert "downlink MergeSVD (each base merge truncated to rank 4" in out.stdout
    for row, plain in zip(rows["svd"][1:], rows["plain"][1:], strict=True):
        assert row["num_ok"] == 3 and row["strategy"]["merge_rank_sent"] == 4
        assert 0 < row["strategy"]["merge_energy_kept"] <= 1
        assert row["strategy"]["stacked_rank"] == plain["strategy"]["stacked_rank"] == 14
        if row["round"] > 1:  # the merges it receives: rank 4 against 14 (and the head, in both)
            assert row["bytes_down_total"] < 0.5 * plain["bytes_down_total"], (row["round"], row, plain)
    summary = json.loads((tmp_path / "svd" / "summary.json").read_text())
    assert summary["downlink_compression"] == "MergeSVD" and summary["base_merges"] == 3
    assert summary["adapter_rank"] == 8 + 3 * 4  # the global adapter's r_max, then each truncated merge
    assert reload_accuracy(tmp_path / "svd") == pytest.approx(summary["final_test_accuracy"], abs=1e-9)
    ckpt_residual = ckpt.load_checkpoint(tmp_path / "svd").merge_residual
    assert ckpt_residual and all(bool(e.isfinite().all()) for e in ckpt_residual.values())
