"""Deployment pieces without a SuperLink: node config, a node's own data, certificates, fedlora-deploy.

The real processes (SuperLink, SuperNodes, TLS, authentication) are in
tests/integration/test_deploy.py; here each piece is checked on its own, fast.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, TINY, compose

from fedlora.cli import certs
from fedlora.config.settings import Settings
from fedlora.flower.node import NodeConfigError, NodeSettings, node_workspace_key, read_node_config
from fedlora.runtime.data import datasets as ds

BBC_NAMES = ("business", "entertainment", "politics", "sports", "tech")
DEPLOY = str(Path(sys.executable).parent / "fedlora-deploy")


@pytest.fixture(scope="module")
def cfg() -> Settings:
    return Settings.from_config(compose([*TINY]))


def _csv(path: Path, labels: list) -> Path:
    pd.DataFrame({"text": [f"article {i}" for i in range(len(labels))], "label": labels}).to_csv(path, index=False)
    return path


# -- node config ------------------------------------------------------------------------------
def test_node_config_of_a_demo_node(cfg: Settings) -> None:
    assert read_node_config(cfg, {"partition-id": 2, "num-partitions": 3}) == NodeSettings(2)
    node = read_node_config(cfg, {"partition-id": 0, "rank": 6, "state-dir": "/var/lib/fedlora"})
    assert node == NodeSettings(0, rank=6, state_dir="/var/lib/fedlora")


def test_every_node_config_problem_names_key_value_and_fix(cfg: Settings, tmp_path: Path) -> None:
    bad = {"partition-id": 3, "num-partitions": 10, "rank": 0, "datapath": "x.csv", "state-dir": ""}
    with pytest.raises(NodeConfigError) as err:
        read_node_config(cfg, bad)
    text = str(err.value)
    assert "5 problem(s) in this SuperNode's --node-config" in text
    assert "partition-id=3: the run has num_clients=3, so client ids are 0..2" in text
    assert "num-partitions=10: the run has num_clients=3: set num-partitions=3 or leave it out" in text
    assert "rank=0: a LoRA rank is an integer >= 1" in text
    assert "datapath='x.csv': not a fedlora node-config key; the keys are partition-id" in text
    assert "state-dir='': give a directory in quotes" in text


@pytest.mark.parametrize("node_config, expected", [
    ({}, "partition-id=None: every node needs its own client id"),
    ({"partition-id": -1}, "partition-id=-1: use an integer >= 0"),
    ({"partition-id": True}, "partition-id=True: use an integer >= 0"),
    ({"partition-id": 0, "rank": 2.5}, "rank=2.5: a LoRA rank is an integer >= 1"),
    ({"partition-id": 0, "data-path": "/nonexistent/train.csv"}, "data-path='/nonexistent/train.csv': no such file"),
    ({"partition-id": 0, "data-path": "train.txt"}, "data-path='train.txt': use a csv/json/jsonl/parquet file"),
])
def test_node_config_single_problems(cfg: Settings, node_config: dict, expected: str) -> None:
    with pytest.raises(NodeConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        read_node_config(cfg, node_config)


def test_node_data_file_must_have_the_runs_columns(cfg: Settings, tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    pd.DataFrame({"body": ["x"], "topic": ["tech"]}).to_json(path, orient="records", lines=True)
    with pytest.raises(NodeConfigError, match=r"has no column\(s\) \['text', 'label'\] \(its columns are "
                                              r"\['body', 'topic'\]\)"):
        read_node_config(cfg, {"partition-id": 0, "data-path": str(path)})


# -- a node's own data --------------------------------------------------------------------------
def test_a_file_lacking_a_class_is_numbered_by_the_runs_labels(tmp_path: Path) -> None:
    # sorted by itself the file would number entertainment 0 and sports 1; the run numbers them 1 and 3
    path = _csv(tmp_path / "node.csv", ["sports", "entertainment", "sports"])
    corpus = ds.load_local(str(path), "text", "label", BBC_NAMES)
    assert corpus.labels == (3, 1, 3) and corpus.label_names == BBC_NAMES
    assert ds.load_local(str(path), "text", "label").labels == (1, 0, 1)  # without the run's names


def test_an_unknown_label_names_the_file_the_value_and_the_fix(tmp_path: Path) -> None:
    path = _csv(tmp_path / "node.csv", ["sports", "weather", "cooking"])
    with pytest.raises(ds.DataError) as err:
        ds.load_local(str(path), "text", "label", BBC_NAMES)
    text = str(err.value)
    assert str(path) in text and "['cooking', 'weather']" in text and "relabel those rows" in text


def test_integer_labels_match_the_runs_names_as_strings(tmp_path: Path) -> None:
    path = _csv(tmp_path / "node.csv", [2, 0, 2])
    assert ds.load_local(str(path), "text", "label", ("0", "1", "2")).labels == (2, 0, 2)


def test_node_workspace_trains_on_all_of_its_own_file(cfg: Settings, tmp_path: Path) -> None:
    from fedlora.runtime.training.workspace import Workspace

    path = _csv(tmp_path / "node.csv", ["tech", "politics", "tech", "business"])
    node = read_node_config(cfg, {"partition-id": 1, "data-path": str(path)})
    ws = Workspace(node_workspace_key(cfg, node, BBC_NAMES))
    assert ws.partition(1) == ws.partition(0) == [0, 1, 2, 3] and ws.test == []
    assert ws.data.labels.tolist() == [4, 2, 4, 0] and ws.num_labels == 5
    assert node_workspace_key(cfg, read_node_config(cfg, {"partition-id": 1}), None).node_data is None
    with pytest.raises(RuntimeError, match="did not receive the run's label names"):
        node_workspace_key(cfg, node, None)


# -- the server's side -------------------------------------------------------------------------
@pytest.fixture
def server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has, so that Flower lets the test build messages: its run, node, task."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """Flower's Grid for GridTransport: ``answer(messages)`` gives the replies, pulled all at once."""

    def answer(self, messages: list) -> list:
        raise NotImplementedError

    def push_messages(self, messages: list) -> list[str]:
        self.replies = self.answer(list(messages))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids: set) -> list:
        replies, self.replies = self.replies, []
        return replies


@pytest.mark.usefixtures("server_process")
def test_a_reply_the_superlink_sends_for_a_dead_node_fails_that_client() -> None:
    """The SuperLink answers for a node whose heartbeats stopped: that client failed, with the reason."""
    from types import SimpleNamespace

    from fedlora.federation import wire
    from fedlora.flower.grid import GridTransport

    reason = "Error: Node Unavailable — The destination node failed to report a heartbeat within 2 × its interval."

    class Grid(FakeGrid):
        def __init__(self, answer_for_message: bool) -> None:
            self.answer_for_message = answer_for_message

        def answer(self, messages: list) -> list:
            (message,) = messages
            message.metadata.__dict__["_message_id"] = "m-100"
            to = "m-100" if self.answer_for_message else "another message"
            return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=0, reply_to_message_id=to),
                                    error=SimpleNamespace(reason=reason), has_error=lambda: True)]

    packet = wire.Packet(config={"server-round": 1})
    transport = GridTransport(Grid(answer_for_message=True))  # type: ignore[arg-type]
    transport.node_of = {0: 100}
    exchange = transport.exchange(1, {0: packet}, 600.0)
    assert exchange.replies[0].error == reason and exchange.replies[0].packet is None
    assert exchange.bytes_down[0] > 0
    transport = GridTransport(Grid(answer_for_message=False))  # type: ignore[arg-type]
    transport.node_of = {0: 100}
    assert transport.exchange(1, {0: packet}, 0.3).replies == {}  # nobody answered for client 0: a timeout


@pytest.mark.usefixtures("server_process")
def test_a_node_that_fails_the_hello_stops_the_run_with_every_reason() -> None:
    from types import SimpleNamespace

    from flwr.app import MetricRecord, RecordDict

    from fedlora.federation import keys
    from fedlora.flower.grid import GridTransport

    class Grid(FakeGrid):
        """Three nodes: one answers, one raises on the node, one is answered for by the SuperLink."""

        def get_node_ids(self) -> list[int]:
            return [11, 12, 13]

        def answer(self, messages: list) -> list:
            assert all(list(m.content[keys.CONFIG][keys.LABEL_NAMES]) == list(BBC_NAMES) for m in messages)
            for i, m in enumerate(messages):
                m.metadata.__dict__["_message_id"] = f"hello-{i}"
            ok = SimpleNamespace(metadata=SimpleNamespace(src_node_id=11, reply_to_message_id="hello-0"),
                                 has_error=lambda: False, content=RecordDict({keys.METRICS: MetricRecord(
                                     {keys.PARTITION_ID: 0, keys.RANK: 4, keys.NUM_EXAMPLES: 7})}))
            bad = SimpleNamespace(metadata=SimpleNamespace(src_node_id=12, reply_to_message_id="hello-1"),
                                  has_error=lambda: True, error=SimpleNamespace(
                                      reason="<class 'NodeConfigError'>:<'rank=0: a LoRA rank is an integer'>"))
            lost = SimpleNamespace(metadata=SimpleNamespace(src_node_id=0, reply_to_message_id="hello-2"),
                                   has_error=lambda: True, error=SimpleNamespace(reason="Error: Node Unavailable"))
            return [ok, bad, lost]

    with pytest.raises(RuntimeError) as err:
        GridTransport(Grid()).connect(3, BBC_NAMES, timeout=5)  # type: ignore[arg-type]
    assert str(err.value) == ("2 node(s) failed the hello; fix them and start the run again:\n"
                              "node 12: rank=0: a LoRA rank is an integer\nnode 13: Error: Node Unavailable")

    class Silent(Grid):
        """Node 14 does not answer within the timeout: its reply is simply not there."""

        def get_node_ids(self) -> list[int]:
            return [11, 14]

        def answer(self, messages: list) -> list:
            return super().answer(messages)[:1]

    with pytest.raises(RuntimeError) as err:
        GridTransport(Silent()).connect(2, BBC_NAMES, timeout=1)  # type: ignore[arg-type]
    assert str(err.value).startswith("1 node(s) failed the hello; fix them and start the run again:\n"
                                     "node 14: no answer within connect_timeout=1 s")


def test_clean_reason_of_a_deployed_client_exception() -> None:
    from fedlora.flower.grid import clean_reason

    wrapped = "<class 'fedlora.flower.node.NodeConfigError'>:<'1 problem(s) in this SuperNode's --node-config:\n  - x'>"
    assert clean_reason(wrapped) == "1 problem(s) in this SuperNode's --node-config:\n  - x"


# -- certificates -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    assert certs.main([str(directory), "--nodes", "2", "--name", "superlink.example.org"]) == 0
    return directory


def _serve_once(directory: Path, port_holder: list[int], ready: threading.Event) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "server.crt", directory / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port_holder.append(sock.getsockname()[1])
        ready.set()
        conn, _ = sock.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_server_certificate_passes_a_real_tls_handshake(cert_dir: Path, host: str) -> None:
    port: list[int] = []
    ready = threading.Event()
    server = threading.Thread(target=_serve_once, args=(cert_dir, port, ready), daemon=True)
    server.start()
    assert ready.wait(10)
    client = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))  # hostname checking on
    with socket.create_connection(("127.0.0.1", port[0]), timeout=10) as raw, \
            client.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.recv(2) == b"ok"
    server.join(10)


def test_certificate_names_keys_and_permissions(cert_dir: Path) -> None:
    assert set(certs.server_names(cert_dir)) == {"127.0.0.1", "::1", "localhost", "superlink.example.org"}
    for name in ("ca.key", "server.key", "node-1.key", "node-2.key"):
        assert (cert_dir / name).stat().st_mode & 0o777 == 0o600
    # the formats flower-supernode --auth-supernode-private-key and `flwr supernode register` read
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    private = load_ssh_private_key((cert_dir / "node-1.key").read_bytes(), None)
    public = load_ssh_public_key((cert_dir / "node-1.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]


def test_running_again_keeps_everything_and_adds_new_nodes(tmp_path: Path) -> None:
    assert certs.main([str(tmp_path), "--nodes", "1"]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert certs.create(tmp_path, nodes=2, names=[], days=30) == ["node-2.key", "node-2.pub"]
    assert all((tmp_path / name).read_bytes() == data for name, data in before.items())
    with pytest.raises(ValueError, match=r"not valid for \['10.0.0.5'\]: delete server.crt"):
        certs.create(tmp_path, nodes=0, names=["10.0.0.5"], days=30)


# -- fedlora-deploy -----------------------------------------------------------------------------
def _deploy(args: list[str], flwr_home: Path, run_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_HOME=str(flwr_home))
    return subprocess.run([DEPLOY, *args, f"hydra.run.dir={run_dir}"], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env=env)


def test_deploy_rejects_bad_config_and_connection_before_contacting_anything(tmp_path: Path) -> None:
    out = _deploy(["--superlink", "prod", "num_clients=0", "strategy=centralized"], tmp_path / "home", tmp_path / "r")
    assert out.returncode == 2, out.stderr
    assert "num_clients=0: must be a positive integer" in out.stderr
    assert "transport='pooled': the centralized upper bound (strategy=centralized) pools" in out.stderr
    assert f"--superlink='prod': {tmp_path / 'home' / 'config.toml'} does not exist" in out.stderr
    assert not (tmp_path / "r" / "flwr-run.log").exists() and (tmp_path / "r" / "FAILED").exists()


def test_connection_problems_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedlora.cli.deploy import read_connection

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    (tmp_path / "config.toml").write_text('[superlink]\ndefault = "tls"\n\n'
                                          '[superlink.tls]\naddress = "127.0.0.1:9093"\n'
                                          'root-certificates = "/nonexistent/ca.crt"\n\n[superlink.local]\n'
                                          'address = ":local:"\n')
    problems: list[str] = []
    assert read_connection("other", problems) == ("other", {})
    assert problems == [f"--superlink='other': {tmp_path / 'config.toml'} has no [superlink.other] table; known "
                        "connections: ['local', 'tls']"]
    problems.clear()
    name, table = read_connection(None, problems)  # the default
    assert name == "tls" and table["address"] == "127.0.0.1:9093"
    assert problems == ["[superlink.tls] root-certificates='/nonexistent/ca.crt': no such file; point it at the CA "
                        "certificate that signed the SuperLink's certificate (fedlora-certs writes ca.crt)"]
    problems.clear()
    read_connection("local", problems)
    assert problems and problems[0].startswith("[superlink.local] address=':local:': give the SuperLink's host:port")


def test_deploy_dry_run_writes_the_config_that_the_apps_will_read(tmp_path: Path) -> None:
    from fedlora.flower.settings import resolve_settings

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "loop"\n\n[superlink.loop]\n'
                                      'address = "127.0.0.1:9093"\ninsecure = true\n')
    run_dir = tmp_path / "run"
    out = _deploy(["--dry-run", *TINY, "strategy=flora"], home, run_dir)
    assert out.returncode == 0, out.stderr
    toml = tomllib.loads((run_dir / "run_config.toml").read_text())
    settings = resolve_settings(None, toml)
    assert settings.strategy.target == "strategies.flora.FLoRA" and settings.loop.num_clients == 3
    assert settings.output_dir == str(run_dir) and settings.run_dir.is_absolute() and settings.deployment
    cfg = settings.source
    assert cfg["deployment"] == {"superlink": "loop", "address": "127.0.0.1:9093", "tls": False, "app": str(ROOT),
                                 "node_worker": True}  # the ClientApps forward to a node worker by default
    assert f"flwr run {ROOT} loop --run-config {run_dir / 'run_config.toml'} --stream" in out.stdout
    assert json.loads(toml["fedlora-config"]) == cfg
    assert (run_dir / "config.yaml").exists() and not (run_dir / "flwr-run.log").exists()
    off = _deploy(["--dry-run", "--no-node-worker", *TINY], home, tmp_path / "off")
    assert off.returncode == 0, off.stderr
    assert json.loads(tomllib.loads((tmp_path / "off" / "run_config.toml").read_text())["fedlora-config"])[
        "deployment"]["node_worker"] is False


def test_ctrl_c_stops_following_without_marking_the_run_failed(tmp_path: Path) -> None:
    from fedlora.cli.deploy import INTERRUPTED, finish

    with pytest.raises(SystemExit) as stopped:
        finish(INTERRUPTED, tmp_path)
    assert stopped.value.code == INTERRUPTED and not (tmp_path / "FAILED").exists()
    with pytest.raises(SystemExit) as broken:
        finish(1, tmp_path)
    assert broken.value.code == 1 and "exited with status 1" in (tmp_path / "FAILED").read_text()
