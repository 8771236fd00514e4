"""Deployment end to end: a real SuperLink and real SuperNodes on 127.0.0.1, driven by fedlora-deploy.

Each SuperNode starts a fresh ``flwr-clientapp`` process per message, which forwards it to the
node's long-lived fedlora node worker (started by the first message, keeping the model and the
data), so these runs check what survives between rounds in a deployment (FLoRA's base merges;
ComPEFT's error-feedback residual, which FedAvg keeps and FLoRA does not; both in
``context.state``, never in the worker): the deployed run must equal the same config run in
simulation, also when a node's worker is killed in the middle of its training and a new one
takes over; the same for SCAFCOM's control variates and the downlink's copies, with a node restarted
between rounds. Also: a node training on its own file with its own rank (next to a node without a
worker, answering in its ``flwr-clientapp`` process), TLS with node authentication (an
unregistered node is refused), and a node killed in the middle of a round.

Tiny settings (3 nodes, 2 rounds, 1 local step, 32 tokens, 32 test articles); every process is
killed by PID when a test ends (tests/integration/flower_cluster.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
from conftest import TINY, jsonl_rows, reload_accuracy, run_fedlora, untimed
from flower_cluster import ONE_THREAD, LocalCluster

from fedlora.core.lora_math import is_lora_key
from fedlora.results.checkpoint import load_client_state

pytestmark = pytest.mark.slow

SMALL = [*TINY, "num_rounds=2", "train.local_steps=1", "model.max_length=32", "data.max_test_examples=32",
         "logging.tensorboard=false", "connect_timeout=300"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path / "cluster")
    yield local
    local.close()


@pytest.fixture
def secure_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path / "cluster", tls=True, auth=True)
    yield local
    local.close()


def _start_nodes(cluster: LocalCluster, configs: list[str]) -> None:
    cluster.start_superlink()
    for i, node_config in enumerate(configs):
        cluster.start_supernode(f"node{i}", node_config)


def _worker_logs(cluster: LocalCluster, names: list[str]) -> dict[str, str]:
    """What the node workers of these SuperNodes logged (every worker that listened at the node's socket)."""
    out = {}
    for name in names:
        workers = cluster.node_workers(name)
        assert len(workers) == 1, (name, workers)
        out[name] = cluster.worker_log(workers[0]).read_text()
    return out


def _kill_worker_mid_training(cluster: LocalCluster, name: str, deploy: subprocess.Popen) -> int:
    """SIGKILL node ``name``'s worker as soon as it starts training; return its PID."""
    deadline = time.monotonic() + 600
    while True:
        assert deploy.poll() is None, cluster.log("deploy")[-3000:]
        assert time.monotonic() < deadline, "the worker never started training"
        for worker in cluster.node_workers(name):
            log = cluster.worker_log(worker)
            if log.exists() and any(line.endswith("): started") and " train (run " in line
                                    for line in log.read_text().splitlines()):
                worker.kill()
                worker.wait(timeout=30)
                return worker.pid
        time.sleep(0.05)


def _restart_after_round_1(cluster: LocalCluster, name: str, deploy: subprocess.Popen) -> tuple[int, list[int]]:
    """Restart node ``name`` (all but its SuperNode) once round 1 is done there: its worker's PID and all PIDs killed.

    Done means: the worker answered round 1, the SuperNode sent the reply, and round 1's
    ``flwr-clientapp`` has exited (it hands the ``context.state`` back after the reply; only the
    SuperExec's standby is left). The server cannot send round 2 before this node's reply has
    reached it and the round has been aggregated and evaluated (over a second here), so the
    restart (checked every 20 ms) happens while the node waits for round 2's message.
    """
    deadline = time.monotonic() + 600
    while True:
        assert deploy.poll() is None, cluster.log("deploy")[-3000:]
        assert time.monotonic() < deadline, "round 1 never ended on the node"
        superexec = cluster.superexec(name)
        if superexec is not None and cluster.log(name).count("Sent successfully") == 2:  # the hello and round 1
            with contextlib.suppress(psutil.NoSuchProcess):
                running = [c for c in superexec.children() if c.status() != psutil.STATUS_ZOMBIE]
                workers = cluster.node_workers(name)
                if len(running) == 1 and len(workers) == 1:
                    log = cluster.worker_log(workers[0])
                    if log.exists() and log.read_text().count("): ok in") == 2:
                        return workers[0].pid, cluster.restart_superexec(name)
        time.sleep(0.02)


def _check_run(run_dir: Path, num_clients: int) -> tuple[list[dict], dict]:
    """Rounds, statuses, bytes and summary of a finished run; the saved adapter reproduces it."""
    rows, summary = jsonl_rows(run_dir), json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["num_ok"] == num_clients and row["num_failed"] == row["num_rejected"] == 0
        assert [c["client"] for c in row["clients"]] == list(range(num_clients))
        assert all(c["status"] == "ok" and c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in row["clients"])
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    assert reload_accuracy(run_dir) == pytest.approx(summary["final_test_accuracy"], abs=1e-9)
    return rows, summary


def _equals_simulation(overrides: list[str], deployed: Path, rows: list[dict], simulated: Path) -> None:
    """The same config run in simulation gives the deployed run's records and adapter: same seed, one torch
    thread everywhere, so the same numbers to the last bit, bytes included."""
    out = run_fedlora(overrides, simulated, env={**os.environ, **ONE_THREAD})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert untimed(jsonl_rows(simulated)) == untimed(rows)
    assert (simulated / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (deployed / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("strategy", ["flora", "fedavg"])
def test_compeft_deployed_equals_simulated(strategy: str, cluster: LocalCluster, tmp_path: Path) -> None:
    """FLoRA's merges and FedAvg's ComPEFT residual survive between rounds in a deployment, exactly.

    Every node's messages are answered by its node worker; in the FLoRA run node 1's worker is
    killed (SIGKILL) while it trains round 1: that message's ClientApp starts a new worker and
    sends it again; in the FedAvg run node 2 is restarted after round 1, all but its SuperNode
    (its fedlora-superexec, the standby ClientApp process and the worker: SIGKILL; a new
    SuperExec), and its round 2 is trained by a new worker. Both runs still equal the simulation
    to the last bit.
    """
    overrides = [*SMALL, f"strategy={strategy}", "compression=compeft"]
    state = tmp_path / "node_state"
    nodes = ["node0", "node1", "node2"]
    _start_nodes(cluster, [f'partition-id={i} num-partitions=3 state-dir="{state}"' for i in range(3)])
    deployed = tmp_path / "deployed"
    if strategy == "flora":
        deploy = cluster.spawn("deploy", cluster.deploy_command(overrides, deployed))
        killed = _kill_worker_mid_training(cluster, "node1", deploy)
        deploy.wait(timeout=900)
        log = cluster.log("deploy")
        assert deploy.returncode == 0, log[-4000:]
    else:
        deploy = cluster.spawn("deploy", cluster.deploy_command(overrides, deployed))
        old_worker, restarted = _restart_after_round_1(cluster, "node2", deploy)
        deploy.wait(timeout=900)
        log = cluster.log("deploy")
        assert deploy.returncode == 0, log[-4000:]
    workers = _worker_logs(cluster, nodes)
    for name, text in workers.items():  # the worker answered the hello and both rounds: no fallback
        assert text.count("): ok in") == 3 and text.count(" train (run ") >= 4, (name, text)
    for name in nodes:  # every message went to a standby ClientApp process (fedlora-superexec)
        assert "the standby was gone" not in cluster.log(name)
    for name in nodes:
        assert "training in this flwr-clientapp process" not in cluster.log(name)
    if strategy == "flora":
        new = cluster.node_workers("node1")[0].pid
        assert new != killed and workers["node1"].count("node worker listening at") == 2, workers["node1"]
        assert f"[pid {killed}] train (run" in workers["node1"]  # killed in the middle of round 1:
        assert f"[pid {new}] hello" not in workers["node1"]  # the new worker trained rounds 1 and 2 cold
        assert workers["node1"].count(f"[pid {new}] train (run") == 4
    else:
        new = cluster.node_workers("node2")[0].pid  # a new worker, started by a standby of the new SuperExec
        assert old_worker in restarted and new not in restarted, restarted
        assert "the SuperExec exited (-9); starting a new one" in cluster.log("node2")
        assert workers["node2"].count("node worker listening at") == 2, workers["node2"]
        assert workers["node2"].count(f"[pid {old_worker}] train (run") == 2  # round 1, before the restart
        assert workers["node2"].count(f"[pid {new}] train (run") == 2  # round 2, cold
    rows, summary = _check_run(deployed, 3)
    assert "round 2/2" in log and "done: final test accuracy" in log
    assert summary["error_feedback"] is True
    if strategy == "flora":
        assert summary["base_merges"] == 2
        for row in rows[1:]:  # every client trained on all merges so far (kept in context.state)
            assert [c["base_version"] for c in row["clients"]] == [row["round"] - 1] * 3
    else:
        assert summary["base_merges"] == 0
    for cid in range(3):  # the residual of each node, on the node's side, one directory per run
        node_dir = state / deployed.name / str(cid)
        assert sorted(p.name for p in node_dir.iterdir()) == ["round_00001.safetensors", "round_00002.safetensors"]
        kept = load_client_state(node_dir, at_most=2)
        # FLoRA's LoRA factors are fresh every round: only the classifier head keeps a residual
        assert kept and any(is_lora_key(k) for k in kept) == (strategy == "fedavg"), sorted(kept)
    _equals_simulation(overrides, deployed, rows, tmp_path / "simulated")


def test_scafcom_with_a_compressed_downlink_deployed_equals_simulated(cluster: LocalCluster, tmp_path: Path) -> None:
    """SCAFCOM's client state (its control variate ``c_k``) and the downlink copies each node holds live on the
    node: node 2 is restarted after round 1 (all but its SuperNode), its round 2 is trained by a new worker from
    what the node kept, and the deployed run still equals the simulation to the last bit."""
    overrides = [*SMALL, "compression=scafcom", "downlink=compeft"]
    state = tmp_path / "node_state"
    _start_nodes(cluster, [f'partition-id={i} num-partitions=3 state-dir="{state}"' for i in range(3)])
    deployed = tmp_path / "deployed"
    deploy = cluster.spawn("deploy", cluster.deploy_command(overrides, deployed))
    old_worker, restarted = _restart_after_round_1(cluster, "node2", deploy)
    deploy.wait(timeout=900)
    log = cluster.log("deploy")
    assert deploy.returncode == 0, log[-4000:]
    workers = _worker_logs(cluster, ["node0", "node1", "node2"])
    new = cluster.node_workers("node2")[0].pid
    assert old_worker in restarted and new not in restarted, restarted
    assert workers["node2"].count(f"[pid {new}] train (run") == 2, workers["node2"]  # round 2, cold
    rows, summary = _check_run(deployed, 3)
    assert summary["downlink_compression"] and summary["compression"]
    for cid in range(3):  # on the node: c_k (SCAFCOM's state) and the copies of the start (the downlink's)
        kept = load_client_state(state / deployed.name / str(cid), at_most=2)
        assert kept is not None
        assert any(k.startswith("control/") for k in kept) and any(k.startswith("view|") for k in kept), sorted(kept)
    _equals_simulation(overrides, deployed, rows, tmp_path / "simulated")


def test_hetlora_prunes_on_a_node_and_the_deployed_run_equals_simulated(cluster: LocalCluster,
                                                                         tmp_path: Path) -> None:
    """HetLoRA's rank self-pruning is decided on the node (its regulariser in the node's loss, the tail's norm
    before and after training), and the server takes the smaller reply: the same ranks and bits as in
    simulation."""
    overrides = [*SMALL, "strategy=hetlora", "strategy.reg_weight=1"]
    _start_nodes(cluster, [f"partition-id={i} num-partitions=3" for i in range(3)])
    deployed = tmp_path / "deployed"
    cluster.deploy(overrides, deployed)
    rows, _ = _check_run(deployed, 3)
    assert [c["rank"] for c in rows[1]["clients"]] == [2, 4, 8]
    assert [c["rank"] for c in rows[2]["clients"]] == [2, 4, 7]  # node 2 pruned a slot after round 2's training
    _equals_simulation(overrides, deployed, rows, tmp_path / "simulated")


def test_fedsa_lora_nodes_keep_and_save_their_own_models_and_the_deployed_run_equals_simulated(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """FedSA-LoRA's ``B`` and head never leave a node: each node keeps them in its state directory between rounds
    and after the last round saves its own model there in peft's format (no one else holds it); the records, the
    shared ``A`` and every client's saved model equal the simulation's to the last bit."""
    overrides = [*SMALL, "strategy=fedsa_lora", "data.client_test_fraction=0.25"]
    state = tmp_path / "node_state"
    _start_nodes(cluster, [f'partition-id={i} num-partitions=3 state-dir="{state}"' for i in range(3)])
    deployed = tmp_path / "deployed"
    cluster.deploy(overrides, deployed)
    rows, summary = jsonl_rows(deployed), json.loads((deployed / "summary.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["num_ok"] == 3 for r in rows[1:])
    on_nodes = {str(c): str(state / deployed.name / str(c) / "adapter") for c in range(3)}
    assert summary["personalized"] is True and summary["client_adapters"] == on_nodes
    assert not (deployed / "client_state").exists()  # nothing of a client's own is on the server's side
    simulated = tmp_path / "simulated"
    out = run_fedlora(overrides, simulated, env={**os.environ, **ONE_THREAD})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    in_sim = json.loads((simulated / "summary.json").read_text())["client_adapters"]

    def placeless(records: list[dict]) -> list[dict]:  # where each client saved differs, nothing else may
        for c in records[-1]["client_eval"]["clients"]:
            c.pop("adapter_dir")
        return untimed(records)

    assert placeless(jsonl_rows(simulated)) == placeless(rows)
    for cid in range(3):
        assert (Path(in_sim[str(cid)]) / "adapter_model.safetensors").read_bytes() == \
            (Path(on_nodes[str(cid)]) / "adapter_model.safetensors").read_bytes()
    assert (simulated / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (deployed / "adapter" / "adapter_model.safetensors").read_bytes()


def test_ffa_lora_with_a_node_on_its_own_file_and_rank(cluster: LocalCluster, tmp_path: Path) -> None:
    """Node 2 trains on its own csv (without 'business' or 'tech': numbered by the run's labels)."""
    from fedlora.runtime.data.datasets import load_bbc_news

    bbc = load_bbc_news()
    keep = [i for i, y in enumerate(bbc.labels) if bbc.label_names[y] in ("entertainment", "sports")][::20]
    own = tmp_path / "node2.csv"
    pd.DataFrame({"text": [bbc.texts[i] for i in keep],
                  "label": [bbc.label_names[bbc.labels[i]] for i in keep]}).to_csv(own, index=False)
    _start_nodes(cluster, ["partition-id=0 num-partitions=3", "partition-id=1 node-worker=false",
                           f'partition-id=2 rank=6 data-path="{own}"'])
    run_dir = tmp_path / "run"
    # every node also holds out a quarter of its examples (node 2: of its own file) and evaluates the final
    # global model on them: through its worker (nodes 0, 2) or in its flwr-clientapp process (node 1)
    cluster.deploy([*SMALL, "strategy=ffa_lora", "data.client_test_fraction=0.25"], run_dir)
    assert cluster.node_workers("node1") == [] and len(cluster.node_workers("node2")) == 1
    rows, _ = _check_run(run_dir, 3)
    held = max(1, round(0.25 * len(keep)))
    node2 = [row["clients"][2] for row in rows[1:]]
    assert all(c["rank"] == 6 and c["num_examples"] == len(keep) - held for c in node2)
    evaluation = rows[-1]["client_eval"]
    assert evaluation["num_failed"] == 0 and evaluation["clients"][2]["num_examples"] == held
    assert all(0 <= c["test_accuracy"] <= 1 for c in evaluation["clients"])
    assert [c["rank"] for c in rows[1]["clients"][:2]] == [2, 4]  # the run's rank tiers for the others
    full = 12 * 6 * (384 + 384) * 4  # A and B of a rank-6 adapter in fp32; FFA-LoRA sends B (and the head)
    assert all(0.45 * full < c["bytes_up"] < 0.6 * full for c in node2)


def test_tls_and_authentication_admit_only_registered_nodes(secure_cluster: LocalCluster, tmp_path: Path) -> None:
    cluster = secure_cluster
    cluster.start_superlink()
    registered = cluster.flwr("supernode", "register", str(cluster.certs / "node-1.pub"), "test")
    assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered.stdout
    stranger = cluster.start_supernode("stranger", "partition-id=0", key="node-2.key")  # a key never registered
    stranger.wait(timeout=120)
    assert stranger.returncode != 0
    assert "Failed to activate SuperNode" in cluster.log("stranger")
    assert "No SuperNode found with the given public key" in cluster.log("superlink")
    cluster.start_supernode("member", "partition-id=0", key="node-1.key")
    run_dir = tmp_path / "run"
    log = cluster.deploy([*SMALL, "num_clients=1", "num_rounds=1", "ranks.tiers=[4]"], run_dir)
    assert "1 client connected" in log
    rows = jsonl_rows(run_dir)
    assert [c["client"] for c in rows[1]["clients"]] == [0] and rows[1]["clients"][0]["status"] == "ok"
    listed = cluster.flwr("supernode", "list", "test", "--format", "json")
    nodes = json.loads(listed.stdout)["nodes"]
    assert len(nodes) == 1, nodes  # the stranger never joined
    assert "https://127.0.0.1" in cluster.log("superlink")


@pytest.mark.parametrize("privacy", ["dp_sgd", "dp_fedavg"])
def test_dp_with_secure_aggregation_deployed_over_tls_equals_the_simulation(privacy: str, tmp_path: Path) -> None:
    """DP-SGD in every client (or DP-FedAvg: each client clips its own change, the server noises the
    sum) and SecAgg+ on three registered SuperNodes over TLS with node authentication: every round's
    masked sum unmasks to the simulation's, bit for bit (the nodes' ids, and so the protocol's ring and
    keys, differ; Poisson batches, noise and quantization are seeded per client and round), and the
    epsilon is the same."""
    cluster = LocalCluster(tmp_path / "cluster", tls=True, auth=True, node_keys=3)
    try:
        cluster.start_superlink()
        for i in (1, 2, 3):
            registered = cluster.flwr("supernode", "register", str(cluster.certs / f"node-{i}.pub"), "test")
            assert registered.returncode == 0, registered.stdout + registered.stderr
            cluster.start_supernode(f"node{i - 1}", f"partition-id={i - 1} num-partitions=3", key=f"node-{i}.key")
        overrides = [*SMALL, f"privacy={privacy}", "privacy.secure=true"]
        if privacy == "dp_fedavg":
            overrides += ["privacy.clip=0.05", "privacy.noise_multiplier=0.5"]
        deployed = tmp_path / "deployed"
        log = cluster.deploy(overrides, deployed)
    finally:
        cluster.close()
    assert "secure aggregation (SecAgg+" in log and "https://127.0.0.1" in cluster.log("superlink")
    assert ("DP-SGD" if privacy == "dp_sgd" else "client-level DP (DP-FedAvg)") in log and "max epsilon" in log
    rows, _ = _check_run(deployed, 3)
    if privacy == "dp_sgd":
        assert all(c["epsilon"] > 0 for row in rows[1:] for c in row["clients"])
    assert all(row["dp_epsilon"] > 0 for row in rows[1:])
    simulated = tmp_path / "simulated"
    out = run_fedlora(overrides, simulated, env={**os.environ, **ONE_THREAD})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    def unsized(value: Any) -> Any:  # node ids travel in the protocol: their varints differ in size
        if isinstance(value, dict):
            return {k: unsized(v) for k, v in value.items() if not k.startswith("bytes_")}
        return [unsized(v) for v in value] if isinstance(value, list) else value

    assert unsized(untimed(jsonl_rows(simulated))) == unsized(untimed(rows))
    assert (simulated / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (deployed / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_node_killed_mid_round_fails_that_round_and_the_run_goes_on(cluster: LocalCluster, tmp_path: Path) -> None:
    _start_nodes(cluster, [f"partition-id={i} num-partitions=3" for i in range(3)])
    run_dir = tmp_path / "run"
    deploy = cluster.spawn("deploy", cluster.deploy_command([*SMALL, "strategy=fedavg", "round_timeout=600"],
                                                            run_dir))
    deadline = time.monotonic() + 600
    while "Receiving: train message" not in cluster.log("node1"):  # node 1 got its round-1 message
        assert deploy.poll() is None, cluster.log("deploy")[-3000:]
        assert time.monotonic() < deadline, "round 1 never started"
        time.sleep(0.2)
    cluster.kill("node1")  # the SuperNode and its flwr-clientapp, no goodbye
    deploy.wait(timeout=600)
    assert deploy.returncode == 0, cluster.log("deploy")[-4000:]
    rows = jsonl_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        by_client = {c["client"]: c for c in row["clients"]}
        assert row["num_ok"] == 2 and row["num_failed"] == 1
        assert by_client[0]["status"] == by_client[2]["status"] == "ok"
        assert by_client[1]["status"] == "failed"
        # the SuperLink reports the dead node when its heartbeats stop: the round does not wait for
        # round_timeout (600 s)
        assert "Node Unavailable" in by_client[1]["error"], by_client[1]
        assert row["round_seconds"] < 300
    assert json.loads((run_dir / "summary.json").read_text())["num_rounds"] == 2
