"""Run the centralized upper bound: pooled data, same step budget, same evaluation and outputs."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config import assign_ranks, eval_batch_size, train_settings, workspace_key
from fedlora.runtime.models import save_peft_adapter, save_reload_base
from fedlora.results.outputs import RunRecorder, evaluate_round, final_metrics, plot_run, truncate_generations
from fedlora.runtime.training.local import train_steps
from fedlora.runtime.training.workspace import get_workspace


def _say(text: str) -> None:
    print(f"[fedlora] {text}", flush=True)


def run_centralized(cfg: Mapping[str, Any], strategy: Any, run_dir: Path) -> dict[str, Any]:
    """Train on the union of the client partitions; log one record per round like a federation."""
    t0 = time.perf_counter()
    ws = get_workspace(workspace_key(cfg))
    metric = ws.task.metric
    n = int(cfg["num_clients"])
    rank = max(assign_ranks(n, cfg["ranks"], int(cfg["seed"])))
    sampled = min(n, max(int(cfg.get("min_clients", 1)), int(round(float(cfg["fraction_train"]) * n))))
    settings = train_settings(cfg)
    steps = settings.local_steps * sampled
    pooled = sorted(i for p in ws.partitions for i in p)
    host = ws.host
    adapter = strategy.init(host.spec(rank), int(cfg["seed"])).adapter
    host.load_state(rank, adapter)
    recorder = RunRecorder(run_dir, tensorboard=bool(cfg.get("logging", {}).get("tensorboard", True)))
    rounds = int(cfg["num_rounds"])
    _say(f"centralized: rank {rank}, {len(pooled)} pooled examples, {steps} steps per round, {rounds} rounds")
    truncate_generations(run_dir, -1)
    metrics = evaluate_round(ws, eval_batch_size(cfg), run_dir, 0)
    recorder.log_round({"round": 0, **metrics, "train_loss": None, "wall_time": time.perf_counter() - t0,
                        "clients": []})
    _say(f"round 0/{rounds}: {metric.name} {metrics[metric.key]:.4f}, loss {metrics['test_loss']:.4f}")
    best = metrics[metric.key]
    for r in range(1, rounds + 1):
        t_round = time.perf_counter()
        params = host.set_trainable(rank, True)
        train_loss = train_steps(host.model, params, ws.data, pooled,
                                 type(settings)(**{**settings.__dict__, "local_steps": steps}),
                                 seed=int(cfg["seed"]) * 1_000_003 + r)
        metrics = evaluate_round(ws, eval_batch_size(cfg), run_dir, r)
        best = metric.best([best, metrics[metric.key]])
        recorder.log_round({"round": r, **metrics, "train_loss": train_loss,
                            "wall_time": time.perf_counter() - t0, "round_seconds": time.perf_counter() - t_round,
                            "clients": [], "num_ok": 1, "num_failed": 0, "bytes_up_total": 0,
                            "bytes_down_total": 0, "strategy": {}})
        _say(f"round {r}/{rounds}: {metric.name} {metrics[metric.key]:.4f}, loss {metrics['test_loss']:.4f}, "
             f"train loss {train_loss:.4f} (elapsed {time.perf_counter() - t0:.0f} s)")
    recorder.close()
    state = host.get_state(rank)
    save_peft_adapter(run_dir / "adapter", host.settings, len(ws.label_names), state, rank,
                      host.settings.alpha(rank), int(cfg["seed"]))
    base_dir = save_reload_base(run_dir / "base", host.settings)
    plot = plot_run(run_dir, title=str(cfg.get("name", "centralized")), metric=metric)
    summary = {"name": cfg.get("name"), "strategy": type(strategy).__name__, "compression": None,
               "num_rounds": rounds, "num_clients": n, **final_metrics(metric, metrics, best),
               "wall_time_seconds": time.perf_counter() - t0,
               "bytes_up_total": 0, "bytes_down_total": 0, "adapter_dir": str(run_dir / "adapter"),
               "adapter_rank": rank, "adapter_lora_alpha": host.settings.alpha(rank), "base_merges": 0,
               "plot": str(plot), "label_names": list(ws.label_names)}
    if base_dir:
        summary["base_dir"] = base_dir
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    _say(f"done: final {metric.name} {metrics[metric.key]:.4f} (best {best:.4f}); outputs in {run_dir}")
    return summary
