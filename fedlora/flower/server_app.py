"""The ServerApp: the federated loop over Flower's Grid.

We drive the Grid directly instead of Flower's ``Strategy.start`` because every client gets its
own message (its rank's slice of the global adapter, the base merges it has not applied yet,
possibly no ``A`` at all), because client sampling must be seeded for reproducible runs, and
because bytes are measured per client and per direction from the serialized messages.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedlora.results import checkpoint as ckpt
from fedlora.federation import keys
from fedlora.core import lora_math as lm
from fedlora.core import validation
from fedlora.config import compressor, eval_batch_size, instantiate, workspace_key
from fedlora.flower import records
from fedlora.flower.clients import (ClientInfo, clean_reason, describe_rank_change, describe_ranks,
                                    discover_clients, sample_clients)
from fedlora.flower.settings import resolve_config
from fedlora.core.metrics import ACCURACY, Metric
from fedlora.runtime.models import save_peft_adapter, save_reload_base
from fedlora.results.outputs import (RunRecorder, evaluate_round, final_metrics, plot_run, read_metrics,
                             truncate_generations)
from fedlora.runtime.training.workspace import get_workspace
from fedlora.core.types import AdapterState, BaseMerge, ClientPlan, ClientUpdate


@dataclass(frozen=True)
class _Sent:
    """What the server sent one client this round: the plan, the start adapter, the size."""

    plan: ClientPlan
    start: AdapterState
    bytes_down: int


def _say(text: str) -> None:
    print(f"[fedlora] {text}", flush=True)


def _feedback_words(compressor: Any) -> str:
    """``error feedback on|off``, or which tensors carry it when not all do (FLoRA: the head only)."""
    scope = compressor.feedback_scope()
    if scope in ("all", "none"):
        return f"error feedback {'on' if scope == 'all' else 'off'}"
    return ("error feedback on for the tensors that continue from the global adapter (a classifier head); "
            "not for the LoRA factors, which start fresh every round")


def _say_round(record: Mapping[str, Any], num_rounds: int, metric: Metric = ACCURACY) -> None:
    """Print the one-line summary of a round."""
    r, tl = record, record["train_loss"]
    problems = "".join(f", {r[k]} {k[4:]}" for k in ("num_failed", "num_rejected") if r.get(k))
    skipped = " (aggregation skipped)" if r.get("aggregation_skipped") else ""
    _say(f"round {r['round']}/{num_rounds}: {metric.name} {r[metric.key]:.4f}, loss {r['test_loss']:.4f}, "
         f"train loss {tl if tl is None else round(tl, 4)}, {r['num_ok']} clients{problems}{skipped}, "
         f"up {r['bytes_up_total'] / 1e6:.2f} MB, down {r['bytes_down_total'] / 1e6:.2f} MB, "
         f"{r['round_seconds']:.1f} s (elapsed {r['wall_time']:.0f} s)")


class Federation:
    """Server-side state and loop of one federated run."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.seed = int(cfg["seed"])
        self.strategy = instantiate(cfg["strategy"])
        self.compressor = compressor(cfg)
        self.ws = get_workspace(workspace_key(cfg))
        self.history: list[BaseMerge] = []
        self.acked: dict[int, int] = {}
        self.start_wall = time.perf_counter()
        self.resume = bool(cfg.get("resume"))
        self.resumed_from = 0  # the checkpoint round this run continued from (0: a fresh run)
        self.merges_saved = 0  # base merges already in the checkpoint directory
        self.checkpointing = bool(cfg.get("checkpoint", True))

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
                keys.RESUME_ROUND: self.resumed_from,
            }),
        })
        first = self.acked.get(info.client_id, 0)
        pending = [(i, self.history[i]) for i in range(first, len(self.history))]
        if pending:
            content[keys.BASE] = records.merges_to_record(pending)
        return content, start

    def decode_reply(self, reply: Message, info: ClientInfo, start: AdapterState, rank: int,
                     send_lora_a: bool = True) -> tuple[ClientUpdate | None, str | None]:
        """Decode and check a client's reply: ``(update, None)`` or ``(None, why it is rejected)``.

        The tensors the client sent are checked (:func:`fedlora.core.validation.check_update`)
        against the keys and shapes of the adapter it started from at its assigned ``rank``
        *before* anything is filled in; only then does ``A`` that stayed on the client (FFA-LoRA)
        come from the start state. A compressed reply is decoded first.
        """
        content = reply.content
        sent = sorted(start) if send_lora_a else sorted(k for k in start if not k.endswith(".lora_A.weight"))
        if keys.METRICS not in content or (keys.COMPRESSED not in content and keys.ADAPTER not in content):
            return None, f"malformed reply: records {sorted(content)}; expected an adapter and metrics"
        m = content[keys.METRICS]
        try:
            if keys.COMPRESSED in content:
                packed = records.record_to_numpy(content[keys.COMPRESSED])
                delta = self.compressor.decode(records.unpack_payload(packed, sent))
                received = {k: start[k] + delta[k].reshape(start[k].shape) for k in delta}
            else:
                received = records.record_to_state(content[keys.ADAPTER])
            reported = int(m[keys.RANK]) if keys.RANK in m else None
            num_examples = int(m[keys.NUM_EXAMPLES])
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            return None, f"cannot decode the update: {type(exc).__name__}: {str(exc)[:200]}"
        reason = validation.check_update(validation.expected_shapes(start, sent), received, rank, reported)
        if reason is not None:
            return None, reason
        state = dict(received)
        for key, value in start.items():
            state.setdefault(key, value.clone())  # A stayed on the client: it equals the start A
        return ClientUpdate(info.client_id, rank, self.ws.host.settings.scaling(rank), num_examples, state), None

    # -- evaluation and output ------------------------------------------------------------------
    def cumulative_merge(self) -> BaseMerge | None:
        """Return the sum of all base merges so far, factored (``None`` before the first)."""
        return lm.concat_merges(self.history) if self.history else None

    def evaluate_round(self, adapter: AdapterState, r_max: int, server_round: int,
                       ) -> tuple[dict[str, float], float]:
        """Metrics of the global model (merged base + global adapter), its generations written
        (causal LM); returns the seconds too."""
        t_eval = time.perf_counter()
        host = self.ws.host
        host.set_base(len(self.history), self.cumulative_merge())
        host.load_state(r_max, adapter)
        metrics = evaluate_round(self.ws, eval_batch_size(self.cfg), self.run_dir, server_round)
        return metrics, time.perf_counter() - t_eval

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
        """Run every round (from the checkpoint when resuming); write metrics, adapter, plot, summary."""
        cfg = self.cfg
        clients = discover_clients(grid, int(cfg["num_clients"]), float(cfg.get("connect_timeout", 600)),
                                   tuple(self.ws.label_names))
        r_max = max(c.rank for c in clients.values())
        num_rounds = int(cfg["num_rounds"])
        ranks = {c.client_id: c.rank for c in clients.values()}
        adapter, sstate, first, best = self._start(ranks, r_max)
        log = cfg.get("logging", {})
        recorder = RunRecorder(self.run_dir, tensorboard=bool(log.get("tensorboard", True)),
                               wandb=log.get("wandb"), config=cfg)
        _say(f"{len(clients)} clients connected, {describe_ranks(ranks)}; "
             f"strategy {type(self.strategy).__name__}"
             + (f" + {type(self.compressor).__name__} ({_feedback_words(self.compressor)})"
                if self.compressor else "")
             + f"; {num_rounds} rounds"
             + (f"; resuming after round {self.resumed_from}" if self.resumed_from else ""))
        if self.ws.truncated:
            _say(f"{self.ws.truncated} of {len(self.ws.data.input_ids)} examples were cut to "
                 f"model.max_length={self.ws.host.settings.max_length} tokens")
        metric = self.ws.task.metric
        if first == 1:
            metrics, eval_seconds = self.evaluate_round(adapter, r_max, 0)
            best = metrics[metric.key]
            recorder.log_round({"round": 0, **metrics, "train_loss": None, "wall_time": self.elapsed(),
                                "eval_seconds": eval_seconds, "clients": []})
            self.save_checkpoint(0, adapter, sstate, ranks, best)
            _say(f"round 0/{num_rounds}: {metric.name} {metrics[metric.key]:.4f}, "
                 f"loss {metrics['test_loss']:.4f}")
        for server_round in range(first, num_rounds + 1):
            adapter, sstate, record = self.train_round(grid, clients, adapter, sstate, server_round, r_max)
            best = metric.best([best, record[metric.key]])
            recorder.log_round(record)
            self.save_checkpoint(server_round, adapter, sstate, ranks, best)
            _say_round(record, num_rounds, metric)
        recorder.close()
        return self.finish(adapter, r_max, read_metrics(self.run_dir)[-1], best)

    def _start(self, ranks: dict[int, int], r_max: int) -> tuple[AdapterState, dict[str, Any], int, float]:
        """Return the global adapter, strategy state, first round to run and best metric value so far.

        A fresh run starts from the strategy's ``init`` and clears what an earlier run may have
        left in the directory; a resumed run loads the checkpoint, restores metrics.jsonl and
        the random-number state, and forgets which merges the clients hold (their processes are
        new, so the next message to each resends every base merge).
        """
        if not self.resume:
            for name in (ckpt.CHECKPOINT_DIR, ckpt.CLIENT_STATE_DIR):  # left by an earlier run here
                shutil.rmtree(self.run_dir / name, ignore_errors=True)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            truncate_generations(self.run_dir, -1)
            init = self.strategy.init(self.ws.host.spec(r_max), self.seed)
            return init.adapter, dict(init.state), 1, 0.0
        state = ckpt.load_checkpoint(self.run_dir)
        if state.ranks != ranks:
            raise RuntimeError(f"resume: the connected clients' ranks differ from the checkpoint's "
                               f"({describe_rank_change(state.ranks, ranks)}); resume with the same clients "
                               f"and rank settings")
        self.history = list(state.merges)
        self.merges_saved = len(self.history)
        self.acked = {}
        self.resumed_from = state.round
        self.start_wall = time.perf_counter() - state.elapsed
        ckpt.write_atomic(self.run_dir / "metrics.jsonl", "".join(x + "\n" for x in state.metrics).encode())
        truncate_generations(self.run_dir, state.round)
        ckpt.restore_rng(state.rng, state.rng.get("torch"))
        return state.adapter, dict(state.strategy_state), state.round + 1, state.best

    def elapsed(self) -> float:
        """Seconds of run time so far (across resumes)."""
        return time.perf_counter() - self.start_wall

    def save_checkpoint(self, server_round: int, adapter: AdapterState, sstate: Mapping[str, Any],
                        ranks: dict[int, int], best: float) -> None:
        """Write the checkpoint of ``server_round`` (see :mod:`fedlora.results.checkpoint`)."""
        if not self.checkpointing:
            return
        metrics = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        state = ckpt.Checkpoint(round=server_round, adapter=adapter, strategy_state=dict(sstate),
                                merges=self.history, ranks=ranks, acked=dict(self.acked), best=best,
                                elapsed=self.elapsed(), metrics=metrics)
        ckpt.save_checkpoint(self.run_dir, state, merges_from=self.merges_saved)
        self.merges_saved = len(self.history)

    def train_round(self, grid: Grid, clients: dict[int, ClientInfo], adapter: AdapterState,
                    sstate: dict[str, Any], server_round: int, r_max: int,
                    ) -> tuple[AdapterState, dict[str, Any], dict[str, Any]]:
        """Run one round: plan, send, collect and check replies, aggregate, evaluate.

        Returns the new global adapter and strategy state and the round's metrics record.
        """
        cfg = self.cfg
        t_round = time.perf_counter()
        sampled = sample_clients(sorted(clients), float(cfg["fraction_train"]), server_round, self.seed,
                                 int(cfg.get("min_clients", 1)))
        messages, sent = [], {}
        for cid in sampled:
            info = clients[cid]
            plan = self.strategy.plan(adapter, sstate, client_id=cid, rank=info.rank,
                                      server_round=server_round, seed=self.seed)
            content, start = self.encode_plan(plan, info, server_round)
            sent[cid] = _Sent(plan, start, records.content_bytes(content))
            messages.append(Message(content, info.node_id, "train", group_id=str(server_round)))
        timeout = float(cfg.get("round_timeout", 3600))
        replies = grid.send_and_receive(messages, timeout=timeout)
        sent_ids = {m.metadata.message_id: cid for m, cid in zip(messages, sampled, strict=True)}
        rows, updates, losses = self._collect(replies, clients, sent, timeout, sent_ids)
        strategy_metrics: dict[str, float] = {}
        skipped = None
        min_fit = int(cfg.get("min_fit_clients", 1))
        if len(updates) < min_fit:
            skipped = (f"{len(updates)} valid update(s), fewer than min_fit_clients={min_fit}: "
                       "the global adapter is kept")
        else:
            result = self.strategy.aggregate(adapter, sstate, updates, server_round=server_round)
            if not validation.is_finite_state(result.adapter):
                skipped = "aggregation produced non-finite values: the global adapter is kept"
            else:
                adapter, sstate, strategy_metrics = result.adapter, dict(result.state), dict(result.metrics)
                if result.merge is not None:
                    self.history.append(result.merge)
        metrics, eval_seconds = self.evaluate_round(adapter, r_max, server_round)
        train_loss = (sum(lv * n for lv, n in losses) / sum(n for _, n in losses)) if losses else None
        client_rows = [rows[c] for c in sorted(rows)]
        record = {
            "round": server_round, **metrics, "train_loss": train_loss,
            "wall_time": self.elapsed(), "round_seconds": time.perf_counter() - t_round,
            "eval_seconds": eval_seconds, "clients": client_rows,
            "num_ok": len(updates), "num_failed": sum(r["status"] == "failed" for r in client_rows),
            "num_rejected": sum(r["status"] == "rejected" for r in client_rows),
            "bytes_down_total": sum(r["bytes_down"] for r in client_rows),
            "bytes_up_total": sum(r.get("bytes_up", 0) for r in client_rows),
            "strategy": {k: float(v) for k, v in strategy_metrics.items()},
        }
        if skipped:
            record["aggregation_skipped"] = skipped
        return adapter, sstate, record

    def _collect(self, replies: Any, clients: dict[int, ClientInfo], sent: dict[int, _Sent], timeout: float,
                 sent_ids: Mapping[str, int] | None = None,
                 ) -> tuple[dict[int, dict[str, Any]], list[ClientUpdate], list[tuple[float, int]]]:
        """Turn the round's replies into per-client rows and the accepted updates (by client id).

        Error replies are ``failed``; replies that fail the checks, or whose change is an outlier
        (``max_norm_ratio``), are ``rejected``; sampled clients that did not answer in time are
        ``failed`` with the timeout as the reason. Replies are handled in client order, not in
        arrival order, so that sums come out bitwise the same in every run.

        ``sent_ids`` maps the id of each message sent to its client: in a deployment the SuperLink
        itself answers for a node whose heartbeats stopped (an error reply from the SuperLink,
        ``reply_to`` our message), and that reply names the client only through it.
        """
        by_node = {c.node_id: c for c in clients.values()}
        arrived = {}
        for reply in replies:
            info = by_node.get(reply.metadata.src_node_id)
            if info is None and sent_ids:
                cid = sent_ids.get(reply.metadata.reply_to_message_id)
                info = clients.get(cid) if cid is not None else None
            if info is not None and info.client_id in sent:
                arrived[info.client_id] = reply
        rows: dict[int, dict[str, Any]] = {}
        accepted: dict[int, ClientUpdate] = {}
        for cid in sorted(sent):
            s = sent[cid]
            row: dict[str, Any] = {"client": cid, "rank": clients[cid].rank, "bytes_down": s.bytes_down}
            rows[cid] = row
            reply = arrived.get(cid)
            if reply is None:
                row.update(status="failed", error=f"no reply within round_timeout={timeout:g} s")
                continue
            if reply.has_error():
                row.update(status="failed", error=clean_reason(str(reply.error.reason)))
                continue
            self.acked[cid] = len(self.history)  # the client applied every merge it was sent
            row["bytes_up"] = records.content_bytes(reply.content)
            update, reason = self.decode_reply(reply, clients[cid], s.start, s.plan.rank, s.plan.send_lora_a)
            if update is None:
                row.update(status="rejected", error=reason)
                continue
            m = reply.content[keys.METRICS]
            row.update(status="ok", num_examples=update.num_examples, train_loss=float(m[keys.TRAIN_LOSS]),
                       train_seconds=float(m[keys.TRAIN_SECONDS]))
            if keys.BASE_VERSION in m:  # the number of base merges the client trained on (FLoRA)
                row["base_version"] = int(m[keys.BASE_VERSION])
            accepted[cid] = update
        norms = {cid: validation.change_norm(u.state, sent[cid].start) for cid, u in accepted.items()}
        ratio = self.cfg.get("max_norm_ratio")
        for cid, reason in validation.norm_outliers(norms, None if ratio is None else float(ratio)).items():
            rows[cid].update(status="rejected", error=reason)
            for key in ("num_examples", "train_loss", "train_seconds", "base_version"):
                rows[cid].pop(key, None)
            del accepted[cid]
        updates = [accepted[c] for c in sorted(accepted)]
        losses = [(rows[c]["train_loss"], rows[c]["num_examples"]) for c in sorted(accepted)]
        return rows, updates, losses

    def finish(self, adapter: AdapterState, r_max: int, last: Mapping[str, Any], best: float,
               ) -> dict[str, Any]:
        """Save the global adapter in peft's format (and a built-in base), plot, write ``summary.json``."""
        settings, metric = self.ws.host.settings, self.ws.task.metric
        folded, rank, alpha = self.folded_adapter(adapter, r_max)
        adapter_dir = self.run_dir / "adapter"
        save_peft_adapter(adapter_dir, settings, len(self.ws.label_names), folded, rank, alpha, self.seed)
        base_dir = save_reload_base(self.run_dir / "base", settings)
        plot = plot_run(self.run_dir, title=str(self.cfg.get("name", "")), metric=metric)
        rows = [json.loads(x) for x in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = {
            "name": self.cfg.get("name"), "strategy": type(self.strategy).__name__,
            "compression": type(self.compressor).__name__ if self.compressor else None,
            "error_feedback": bool(self.compressor.error_feedback) if self.compressor else None,
            "error_feedback_tensors": self.compressor.feedback_scope() if self.compressor else None,
            "num_rounds": int(self.cfg["num_rounds"]), "num_clients": int(self.cfg["num_clients"]),
            **final_metrics(metric, last, best),
            "wall_time_seconds": time.perf_counter() - self.start_wall,
            "bytes_up_total": sum(r.get("bytes_up_total", 0) for r in rows),
            "bytes_down_total": sum(r.get("bytes_down_total", 0) for r in rows),
            "adapter_dir": str(adapter_dir), "adapter_rank": rank, "adapter_lora_alpha": alpha,
            "base_merges": len(self.history), "plot": str(plot), "label_names": list(self.ws.label_names),
        }
        if base_dir:
            summary["base_dir"] = base_dir
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        _say(f"done: final {metric.name} {last[metric.key]:.4f} (best {best:.4f}) in "
             f"{summary['wall_time_seconds']:.0f} s; outputs in {self.run_dir}")
        return summary


def make_server_app(config: Mapping[str, Any] | None = None) -> ServerApp:
    """Build the ServerApp; ``config`` is the resolved run config (``None``: read run_config)."""
    app = ServerApp()
    closure = dict(config) if config is not None else None

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve_config(closure, context.run_config)
        run_dir = Path(cfg["output_dir"])
        try:
            Federation(cfg, run_dir).run(grid)
        except Exception:
            if closure is None:  # deployment: no `fedlora` process around to record the failure
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "FAILED").write_text(traceback.format_exc())
            raise

    return app


# Deployment entry point (`flwr run`): the config arrives in the run config.
app = make_server_app(None)
