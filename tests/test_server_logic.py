"""Server-side pieces that need no Ray: sampling and folding merges into the saved adapter."""

from __future__ import annotations

import torch

from fedlora.core import lora_math as lm
from fedlora.flower.clients import sample_clients


def test_sampling_is_seeded_sorted_and_sized() -> None:
    ids = list(range(100))
    a = sample_clients(ids, 0.1, server_round=3, seed=7)
    assert a == sample_clients(ids, 0.1, server_round=3, seed=7)
    assert a != sample_clients(ids, 0.1, server_round=4, seed=7)
    assert len(a) == 10 and a == sorted(a)
    assert sample_clients(ids, 0.001, server_round=1, seed=0, min_clients=3) != []
    assert len(sample_clients(ids, 0.001, server_round=1, seed=0, min_clients=3)) == 3
    assert sample_clients([4, 2], 1.0, server_round=1, seed=0) == [2, 4]


def test_folded_adapter_product_equals_global_plus_merges() -> None:
    # The saved adapter must load on the pristine base: fold s*B_g@A_g and the merges into one LoRA.
    from types import SimpleNamespace

    from fedlora.flower.server_app import Federation

    torch.manual_seed(0)
    m, n, r = 6, 5, 3
    adapter = {"l.lora_A.weight": torch.randn(r, n), "l.lora_B.weight": torch.randn(m, r), "head": torch.ones(2)}
    merges = [{"l": (torch.randn(m, 4), torch.randn(4, n))}, {"l": (torch.randn(m, 2), torch.randn(2, n))}]
    fed = Federation.__new__(Federation)
    fed.history = merges
    fed.ws = SimpleNamespace(host=SimpleNamespace(settings=SimpleNamespace(scaling=lambda rank: 2.0,
                                                                             alpha=lambda rank: 2.0 * rank)))
    folded, rank, alpha = fed.folded_adapter(adapter, r)
    assert rank == r + 6 and alpha == float(rank)  # scaling 1
    expected = 2.0 * adapter["l.lora_B.weight"] @ adapter["l.lora_A.weight"] + sum(b @ a for b, a in
                                                                                   (mm["l"] for mm in merges))
    got = (alpha / rank) * folded["l.lora_B.weight"] @ folded["l.lora_A.weight"]
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(folded["head"], adapter["head"])
    assert lm.rank_of(folded) == rank


# -- collecting a round's replies (no Ray: fake replies carrying real Flower records) -----------------
class _Reply:
    def __init__(self, node_id: int, content=None, error: str | None = None) -> None:  # noqa: ANN001
        from types import SimpleNamespace

        self.metadata = SimpleNamespace(src_node_id=node_id)
        self.content = content
        self.error = SimpleNamespace(reason=error)

    def has_error(self) -> bool:
        return self.error.reason is not None


def _federation(max_norm_ratio: float | None = 10.0):  # noqa: ANN202
    from types import SimpleNamespace

    from fedlora.flower.server_app import Federation

    fed = Federation.__new__(Federation)
    fed.cfg = {"max_norm_ratio": max_norm_ratio}
    fed.history, fed.acked, fed.compressor = [], {}, None
    fed.ws = SimpleNamespace(host=SimpleNamespace(settings=SimpleNamespace(scaling=lambda rank: 2.0)))
    return fed


def _content(state: dict, rank: int, loss: float = 1.0):  # noqa: ANN202
    from flwr.app import MetricRecord, RecordDict

    from fedlora.federation import keys
    from fedlora.flower import records

    return RecordDict({keys.ADAPTER: records.state_to_record(state), keys.METRICS: MetricRecord({
        keys.TRAIN_LOSS: loss, keys.NUM_EXAMPLES: 10, keys.RANK: rank, keys.TRAIN_SECONDS: 0.5})})


def _round(order: list[int]):  # noqa: ANN202
    from fedlora.flower.clients import ClientInfo
    from fedlora.flower.server_app import _Sent
    from fedlora.core.types import ClientPlan

    torch.manual_seed(0)
    start = {"l.lora_A.weight": torch.randn(2, 4), "l.lora_B.weight": torch.zeros(6, 2)}
    clients = {c: ClientInfo(node_id=100 + c, client_id=c, rank=2, num_examples=10) for c in range(6)}
    sent = {c: _Sent(ClientPlan(rank=2, adapter=start, init_seed=0), start, 1000) for c in range(6)}
    trained = {c: {k: v + 0.01 * (c + 1) for k, v in start.items()} for c in range(6)}
    replies = {
        0: _Reply(100, _content(trained[0], 2, 1.0)),
        1: _Reply(101, _content(trained[1], 2, 2.0)),
        2: _Reply(102, error="<class 'ClientAppException'>:<'\nException ClientAppException occurred. "
                             "Message: injected failure (round 1, client 2)'>"),
        3: _Reply(103, _content({**trained[3], "l.lora_B.weight": torch.full((6, 2), float("nan"))}, 2)),
        4: _Reply(104, _content({k: s + 1e3 * (t - s) for (k, t), s in zip(trained[4].items(), start.values())}, 2)),
        # client 5 never answers (timeout)
    }
    return _federation()._collect([replies[c] for c in order], clients, sent, timeout=30.0)


def test_collect_records_every_outcome_and_ignores_arrival_order() -> None:
    rows, updates, losses = _round([0, 1, 2, 3, 4])
    status = {c: (r["status"], r.get("error", "")) for c, r in rows.items()}
    assert list(rows) == [0, 1, 2, 3, 4, 5]
    assert status[0][0] == status[1][0] == "ok"
    assert status[2] == ("failed", "injected failure (round 1, client 2)")
    assert status[3][0] == "rejected" and "NaN" in status[3][1]
    assert status[4][0] == "rejected" and "max_norm_ratio=10" in status[4][1]
    assert status[5] == ("failed", "no reply within round_timeout=30 s")
    assert [u.client_id for u in updates] == [0, 1] and losses == [(1.0, 10), (2.0, 10)]
    assert "train_loss" not in rows[4] and rows[4]["bytes_up"] > 0  # it arrived, it was not used
    again = _round([4, 3, 1, 0, 2])
    assert again[0] == rows and again[2] == losses
    assert all(torch.equal(a.state[k], b.state[k]) for a, b in zip(again[1], updates, strict=True) for k in a.state)


def test_collect_fills_in_a_that_stayed_on_the_client_after_checking() -> None:
    from fedlora.flower.clients import ClientInfo
    from fedlora.flower.server_app import _Sent
    from fedlora.core.types import ClientPlan

    start = {"l.lora_A.weight": torch.randn(2, 4), "l.lora_B.weight": torch.zeros(6, 2)}
    info = {0: ClientInfo(100, 0, 2, 10)}
    sent = {0: _Sent(ClientPlan(rank=2, adapter=start, init_seed=0, send_lora_a=False), start, 10)}
    b_only = {"l.lora_B.weight": torch.ones(6, 2)}
    rows, updates, _ = _federation()._collect([_Reply(100, _content(b_only, 2))], info, sent, 5.0)
    assert rows[0]["status"] == "ok" and torch.equal(updates[0].state["l.lora_A.weight"], start["l.lora_A.weight"])
    # a client that leaves out B is rejected, not silently given the start B
    rows, updates, _ = _federation()._collect([_Reply(100, _content({}, 2))], info, sent, 5.0)
    assert rows[0]["status"] == "rejected" and "missing keys: l.lora_B.weight" in rows[0]["error"]


def test_clean_reason_keeps_the_clients_message() -> None:
    from fedlora.flower.clients import clean_reason

    assert clean_reason("<class 'X'>:<'\nException ClientAppException occurred. Message: boom'>") == "boom"
    assert clean_reason("plain") == "plain"


def test_describe_ranks_lists_small_federations_and_counts_large_ones() -> None:
    from fedlora.flower.clients import describe_ranks
    assert describe_ranks({1: 4, 0: 2}) == "ranks {0: 2, 1: 4}"
    big = {i: (2, 4, 8, 16)[i % 4] for i in range(1000)}
    assert describe_ranks(big) == "ranks 2 x250, 4 x250, 8 x250, 16 x250"


def test_describe_rank_change_names_the_clients_that_differ() -> None:
    from fedlora.flower.clients import describe_rank_change
    old = {i: 4 for i in range(10)}
    assert describe_rank_change(old, {**old, 3: 8}) == "client 3: 4 -> 8"
    assert describe_rank_change({0: 2}, {1: 2}) == "client 0: 2 -> absent; client 1: absent -> 2"
    many = describe_rank_change(old, {i: 16 for i in range(10)}, limit=2)
    assert many == "client 0: 4 -> 16; client 1: 4 -> 16 and 8 more"


def test_resume_points_hydra_at_the_run(tmp_path) -> None:  # noqa: ANN001
    from fedlora.cli.main import resume_arguments

    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert resume_arguments([f"resume={tmp_path}"]) == [f"resume={tmp_path}", f"hydra.run.dir={tmp_path}",
                                                         "hydra.output_subdir=null"]
    assert resume_arguments(["resume=/nope"]) == ["resume=/nope"]  # validate() reports it
    assert resume_arguments(["seed=1"]) == ["seed=1"]
