"""The ServerApp: the federated loop over Flower's Grid.

We drive the Grid directly instead of Flower's ``Strategy.start`` because every client gets its
own message (its rank's slice of the global adapter, the base merges it has not applied yet,
possibly no ``A`` at all), because client sampling must be seeded for reproducible runs, and
because bytes are measured per client and per direction from the serialized messages.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora import keys
from fedlora.adapters import lora_math as lm
from fedlora.config import instantiate, workspace_key
from fedlora.flower import records
from fedlora.flower.settings import resolve_config
from fedlora.models import save_peft_adapter
from fedlora.results import RunRecorder, plot_run
from fedlora.training.local import evaluate
from fedlora.training.workspace import get_workspace
from fedlora.types import AdapterState, BaseMerge, ClientPlan, ClientUpdate


@dataclass(frozen=True)
class ClientInfo:
    """A connected client: its node, partition id, rank and training-set size."""

    node_id: int
    client_id: int
    rank: int
    num_examples: int


def _say(text: str) -> None:
    print(f"[fedlora] {text}", flush=True)


def discover_clients(grid: Grid, expected: int, timeout: float) -> dict[int, ClientInfo]:
    """Wait for ``expected`` nodes, ask each who it is, return ``{client_id: ClientInfo}``."""
    deadline = time.monotonic() + timeout
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = sorted(grid.get_node_ids())
    if not node_ids:
        raise RuntimeError(f"no client connected within {timeout:.0f} s")
    hello = [Message(RecordDict({keys.CONFIG: ConfigRecord({keys.ACTION: keys.HELLO})}), node_id, "query",
                     group_id="hello") for node_id in node_ids]
    clients: dict[int, ClientInfo] = {}
    for reply in grid.send_and_receive(hello, timeout=timeout):
        if reply.has_error():
            _say(f"node {reply.metadata.src_node_id} failed the hello: {reply.error.reason}")
            continue
        m = reply.content[keys.METRICS]
        info = ClientInfo(reply.metadata.src_node_id, int(m[keys.PARTITION_ID]), int(m[keys.RANK]),
                          int(m[keys.NUM_EXAMPLES]))
        if info.client_id in clients:
            raise RuntimeError(f"two nodes claim partition-id {info.client_id}; give each node its own")
        clients[info.client_id] = info
    return clients


def sample_clients(client_ids: list[int], fraction: float, server_round: int, seed: int,
                   min_clients: int = 1) -> list[int]:
    """Sample ``max(min_clients, round(fraction * N))`` clients, seeded by (seed, round)."""
    k = min(len(client_ids), max(min_clients, int(round(fraction * len(client_ids)))))
    rng = random.Random(seed * 7919 + server_round)
    return sorted(rng.sample(sorted(client_ids), k))


class Federation:
    """Server-side state and loop of one federated run."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.seed = int(cfg["seed"])
        self.strategy = instantiate(cfg["strategy"])
        self.compressor = instantiate(cfg.get("compression"))
        self.ws = get_workspace(workspace_key(cfg))
        self.history: list[BaseMerge] = []
        self.acked: dict[int, int] = {}
        self.start_wall = time.perf_counter()

    # -- messages -------------------------------------------------------------------------------
    def _start_state(self, plan: ClientPlan, spec: Any) -> AdapterState:
        if plan.adapter is not None:
            return {k: v.clone() for k, v in plan.adapter.items()}
        return lm.fresh_state(spec.modules, plan.rank, plan.init_seed, plan.head)

    def encode_plan(self, plan: ClientPlan, info: ClientInfo, server_round: int) -> tuple[RecordDict, AdapterState]:
        """Return the message content for one client and the adapter it will start from."""
        spec = self.ws.host.spec(plan.rank)
        start = self._start_state(plan, spec)
        fresh = plan.adapter is None
        if fresh:
            sent = {k: v for k, v in start.items() if not lm.is_lora_key(k)}
        elif not plan.send_lora_a:
            sent = {k: v for k, v in start.items() if not k.endswith(".lora_A.weight")}
        else:
            sent = start
        content = RecordDict({
            keys.ADAPTER: records.state_to_record(sent),
            keys.CONFIG: ConfigRecord({
                keys.SERVER_ROUND: server_round, keys.RANK: plan.rank, keys.INIT_SEED: plan.init_seed,
                keys.FRESH: fresh, keys.TRAIN_LORA_A: plan.train_lora_a, keys.SEND_LORA_A: plan.send_lora_a,
            }),
        })
        first = self.acked.get(info.client_id, 0)
        pending = [(i, self.history[i]) for i in range(first, len(self.history))]
        if pending:
            content[keys.BASE] = records.merges_to_record(pending)
        return content, start

    def decode_reply(self, reply: Message, info: ClientInfo, start: AdapterState,
                     send_lora_a: bool = True) -> ClientUpdate:
        """Turn a client's reply into a complete trained adapter (decompress, fill in ``A``)."""
        content = reply.content
        if keys.COMPRESSED in content:
            sent = sorted(start) if send_lora_a else sorted(k for k in start if not k.endswith(".lora_A.weight"))
            packed = records.record_to_numpy(content[keys.COMPRESSED])
            delta = self.compressor.decode(records.unpack_payload(packed, sent))
            state = {k: start[k] + delta[k].reshape(start[k].shape) for k in delta}
        else:
            state = records.record_to_state(content[keys.ADAPTER])
        for key, value in start.items():
            state.setdefault(key, value.clone())  # A stayed on the client: it equals the start A
        m = content[keys.METRICS]
        rank = int(m[keys.RANK])
        return ClientUpdate(info.client_id, rank, self.ws.host.settings.scaling(rank),
                            int(m[keys.NUM_EXAMPLES]), state)

    # -- evaluation and output ------------------------------------------------------------------
    def cumulative_merge(self) -> BaseMerge | None:
        """Return the sum of all base merges so far, factored (``None`` before the first)."""
        return lm.concat_merges(self.history) if self.history else None

    def evaluate(self, adapter: AdapterState, r_max: int) -> tuple[float, float]:
        """Test loss and accuracy of the global model (merged base + global adapter)."""
        host = self.ws.host
        host.set_base(len(self.history), self.cumulative_merge())
        host.load_state(r_max, adapter)
        ev = self.cfg.get("eval", {})
        return evaluate(host.model, self.ws.data, self.ws.test, int(ev.get("batch_size", 64)))

    def folded_adapter(self, adapter: AdapterState, r_max: int) -> tuple[AdapterState, int, float]:
        """Fold the base merges into one LoRA so that it loads on the pristine base model.

        With merges ``B_cum @ A_cum`` the folded adapter is ``A = [A_g; A_cum]`` and
        ``B = [s B_g, B_cum]`` at scaling 1 (``lora_alpha = r``), whose product is exactly
        ``s B_g A_g + B_cum A_cum``.
        """
        s = self.ws.host.settings.scaling(r_max)
        merge = self.cumulative_merge()
        if merge is None:
            return adapter, r_max, self.ws.host.settings.alpha(r_max)
        pairs, others = lm.split_state(adapter)
        folded = {m: (torch.cat([a, merge[m][1]], dim=0), torch.cat([s * b, merge[m][0]], dim=1))
                  for m, (a, b) in pairs.items()}
        rank = lm.rank_of(lm.join_state(folded, {}))
        return lm.join_state(folded, others), rank, float(rank)

    # -- the loop -------------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict[str, Any]:
        """Run every round; write metrics, the adapter, the plot and the summary."""
        cfg = self.cfg
        clients = discover_clients(grid, int(cfg["num_clients"]), float(cfg.get("connect_timeout", 600)))
        r_max = max(c.rank for c in clients.values())
        spec = self.ws.host.spec(r_max)
        init = self.strategy.init(spec, self.seed)
        adapter, sstate = init.adapter, dict(init.state)
        log = cfg.get("logging", {})
        recorder = RunRecorder(self.run_dir, tensorboard=bool(log.get("tensorboard", True)),
                               wandb=log.get("wandb"), config=cfg)
        num_rounds = int(cfg["num_rounds"])
        ranks = {c.client_id: c.rank for c in clients.values()}
        _say(f"{len(clients)} clients connected, ranks {dict(sorted(ranks.items()))}; "
             f"strategy {type(self.strategy).__name__}"
             + (f" + {type(self.compressor).__name__}" if self.compressor else "") + f"; {num_rounds} rounds")
        t_eval = time.perf_counter()
        loss, acc = self.evaluate(adapter, r_max)
        recorder.log_round({"round": 0, "test_accuracy": acc, "test_loss": loss, "train_loss": None,
                            "wall_time": time.perf_counter() - self.start_wall,
                            "eval_seconds": time.perf_counter() - t_eval, "clients": []})
        _say(f"round 0/{num_rounds}: test accuracy {acc:.4f}, loss {loss:.4f}")
        best = acc
        for server_round in range(1, num_rounds + 1):
            t_round = time.perf_counter()
            sampled = sample_clients(sorted(clients), float(cfg["fraction_train"]), server_round, self.seed,
                                     int(cfg.get("min_clients", 1)))
            messages, starts, down, sends_a = [], {}, {}, {}
            for cid in sampled:
                info = clients[cid]
                plan = self.strategy.plan(adapter, sstate, client_id=cid, rank=info.rank,
                                          server_round=server_round, seed=self.seed)
                content, starts[cid] = self.encode_plan(plan, info, server_round)
                sends_a[cid] = plan.send_lora_a
                down[cid] = records.content_bytes(content)
                messages.append(Message(content, info.node_id, "train", group_id=str(server_round)))
            by_node = {c.node_id: c for c in clients.values()}
            replies = grid.send_and_receive(messages, timeout=float(cfg.get("round_timeout", 3600)))
            updates, rows, losses = [], {}, []
            for reply in replies:
                info = by_node[reply.metadata.src_node_id]
                row = {"client": info.client_id, "rank": info.rank, "bytes_down": down[info.client_id]}
                if reply.has_error():
                    row.update(status="failed", error=str(reply.error.reason))
                else:
                    update = self.decode_reply(reply, info, starts[info.client_id], sends_a[info.client_id])
                    m = reply.content[keys.METRICS]
                    row.update(status="ok", bytes_up=records.content_bytes(reply.content),
                               num_examples=update.num_examples, train_loss=float(m[keys.TRAIN_LOSS]),
                               train_seconds=float(m[keys.TRAIN_SECONDS]))
                    updates.append(update)
                    losses.append((float(m[keys.TRAIN_LOSS]), update.num_examples))
                    self.acked[info.client_id] = len(self.history)
                rows[info.client_id] = row
            for cid in sampled:
                rows.setdefault(cid, {"client": cid, "rank": clients[cid].rank, "bytes_down": down[cid],
                                      "status": "failed", "error": "no reply before the round timeout"})
            strategy_metrics: dict[str, float] = {}
            if updates:
                updates.sort(key=lambda u: u.client_id)
                result = self.strategy.aggregate(adapter, sstate, updates, server_round=server_round)
                adapter, sstate, strategy_metrics = result.adapter, dict(result.state), dict(result.metrics)
                if result.merge is not None:
                    self.history.append(result.merge)
            t_eval = time.perf_counter()
            loss, acc = self.evaluate(adapter, r_max)
            eval_seconds = time.perf_counter() - t_eval
            best = max(best, acc)
            train_loss = (sum(lv * n for lv, n in losses) / sum(n for _, n in losses)) if losses else None
            client_rows = [rows[c] for c in sorted(rows)]
            record = {
                "round": server_round, "test_accuracy": acc, "test_loss": loss, "train_loss": train_loss,
                "wall_time": time.perf_counter() - self.start_wall,
                "round_seconds": time.perf_counter() - t_round, "eval_seconds": eval_seconds,
                "clients": client_rows,
                "num_ok": len(updates), "num_failed": len(client_rows) - len(updates),
                "bytes_down_total": sum(r["bytes_down"] for r in client_rows),
                "bytes_up_total": sum(r.get("bytes_up", 0) for r in client_rows),
                "strategy": {k: float(v) for k, v in strategy_metrics.items()},
            }
            recorder.log_round(record)
            failed = f", {record['num_failed']} failed" if record["num_failed"] else ""
            _say(f"round {server_round}/{num_rounds}: test accuracy {acc:.4f}, loss {loss:.4f}, train loss "
                 f"{train_loss if train_loss is None else round(train_loss, 4)}, {len(updates)} clients{failed}, "
                 f"up {record['bytes_up_total'] / 1e6:.2f} MB, down {record['bytes_down_total'] / 1e6:.2f} MB, "
                 f"{record['round_seconds']:.1f} s (elapsed {record['wall_time']:.0f} s)")
        recorder.close()
        return self.finish(adapter, r_max, acc, loss, best)

    def finish(self, adapter: AdapterState, r_max: int, acc: float, loss: float, best: float) -> dict[str, Any]:
        """Save the global adapter in peft's format, plot, and write ``summary.json``."""
        settings = self.ws.host.settings
        folded, rank, alpha = self.folded_adapter(adapter, r_max)
        adapter_dir = self.run_dir / "adapter"
        save_peft_adapter(adapter_dir, settings, len(self.ws.label_names), folded, rank, alpha, self.seed)
        plot = plot_run(self.run_dir, title=str(self.cfg.get("name", "")))
        rows = [json.loads(x) for x in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = {
            "name": self.cfg.get("name"), "strategy": type(self.strategy).__name__,
            "compression": type(self.compressor).__name__ if self.compressor else None,
            "num_rounds": int(self.cfg["num_rounds"]), "num_clients": int(self.cfg["num_clients"]),
            "final_test_accuracy": acc, "final_test_loss": loss, "best_test_accuracy": best,
            "wall_time_seconds": time.perf_counter() - self.start_wall,
            "bytes_up_total": sum(r.get("bytes_up_total", 0) for r in rows),
            "bytes_down_total": sum(r.get("bytes_down_total", 0) for r in rows),
            "adapter_dir": str(adapter_dir), "adapter_rank": rank, "adapter_lora_alpha": alpha,
            "base_merges": len(self.history), "plot": str(plot), "label_names": list(self.ws.label_names),
        }
        if any(math.isnan(v) for v in (acc, loss)):
            summary["warning"] = "final metrics are NaN"
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        _say(f"done: final test accuracy {acc:.4f} (best {best:.4f}) in {summary['wall_time_seconds']:.0f} s; "
             f"outputs in {self.run_dir}")
        return summary


def make_server_app(config: Mapping[str, Any] | None = None) -> ServerApp:
    """Build the ServerApp; ``config`` is the resolved run config (``None``: read run_config)."""
    app = ServerApp()
    closure = dict(config) if config is not None else None

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve_config(closure, context.run_config)
        Federation(cfg, Path(cfg["output_dir"])).run(grid)

    return app


# Deployment entry point (`flwr run`): the config arrives in the run config.
app = make_server_app(None)
