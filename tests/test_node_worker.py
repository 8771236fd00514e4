"""The node worker's protocol and process: framing, the socket, the fallback signals, a real worker.

The deployed runs through workers (bit for bit equal to simulation, a worker killed mid-run) are
in tests/integration/test_deploy.py; here each piece is checked on its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, TINY, compose

from fedlora.serving import node_protocol as proto


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


def test_a_frame_carries_arrays_exactly_and_in_order() -> None:
    arrays = {
        "msg/adapter/b": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "msg/adapter/a": np.array([[1.5, -0.0, np.nan]], dtype=np.float64),
        "state/x/idx": np.array([3, 1, 2], dtype=np.int64)[::-1],  # not contiguous
        "state/x/bits": np.array([], dtype=np.uint8),
        "state/x/scalar": np.array(2.5, dtype=np.float32),
        "state/x/big": np.array([1, 2], dtype=">i4"),
    }
    header = {"kind": "train", "config": {"server-round": 3, "fresh": True, "lr": 0.1, "names": ["a", "b"]}}
    left, right = _pair()
    with left, right:
        sender = threading.Thread(target=proto.send_frame, args=(left, header, arrays))
        sender.start()
        got_header, got = proto.recv_frame(right)
        sender.join()
    assert got_header == header
    assert list(got) == list(arrays)
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(value).tobytes(), name
        assert got[name].flags.writeable


def test_records_flatten_and_come_back_with_empty_ones() -> None:
    records = {"adapter": {"k.lora_A": np.ones((2, 3)), "k/with/slash": np.zeros(1)}, "empty": {}}
    flat = proto.pack_records("msg", records)
    back = proto.unpack_records("msg", {**flat, "state/other/x": np.ones(1)}, list(records))
    assert list(back) == ["adapter", "empty"] and list(back["adapter"]) == ["k.lora_A", "k/with/slash"]


def test_socket_path_is_short_private_and_per_node_and_code(tmp_path: Path) -> None:
    home = str(tmp_path / ("x" * 150))
    a = proto.socket_path(home, 1, "/app/one")
    assert len(str(a)) < 100 and a.parent.name == f"fedlora-{os.getuid()}"
    assert a == proto.socket_path(home, 1, "/app/one")
    assert len({a, proto.socket_path(home, 2, "/app/one"), proto.socket_path(home, 1, "/app/two"),
                proto.socket_path(str(tmp_path), 1, "/app/one")}) == 4


def test_a_socket_directory_that_is_not_private_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(proto.WorkerUnavailable, match="is not a private directory"):
        proto.call(shared / "w.sock", {"kind": "hello"}, {})
    proto.private_dir(tmp_path / "mine")
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o700


def _serve_in_thread(path: Path, handler: proto.Handler, **kw: Any) -> tuple[threading.Thread, list[str]]:
    stopped: list[str] = []
    thread = threading.Thread(target=lambda: stopped.append(proto.serve(path, handler, log=lambda _: None, **kw)))
    thread.start()
    assert proto.wait_until_listening(path, None, 10)
    return thread, stopped


def _short_socket(tmp_path: Path) -> Path:
    return proto.socket_path(str(tmp_path), os.getpid(), str(tmp_path))


def test_serve_answers_requests_refuses_other_protocols_and_exits_when_idle_or_orphaned(tmp_path: Path) -> None:
    path = _short_socket(tmp_path)

    def echo(header: dict, arrays: dict) -> tuple[dict, dict]:
        return {"ok": True, "kind": header["kind"]}, {k: v * 2 for k, v in arrays.items()}

    thread, stopped = _serve_in_thread(path, echo, idle_timeout=1.5)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert Path(f"{path}.pid").read_text() == str(os.getpid())
    reply, out = proto.call(path, {"kind": "hello"}, {"a": np.arange(3)})
    assert reply == {"ok": True, "kind": "hello"} and out["a"].tolist() == [0, 2, 4]
    with socket.socket(socket.AF_UNIX) as sock:  # a peer that speaks another version
        sock.connect(str(path))
        proto.send_frame(sock, {"protocol": 99}, {})
        refused, _ = proto.recv_frame(sock)
    assert refused["ok"] is False and "protocol 99" in refused["worker_error"]
    assert proto.serve(path, echo, idle_timeout=1) == f"another worker already listens at {path}"
    thread.join(timeout=10)
    assert stopped == ["idle for 1.5 s"] and not path.exists() and not Path(f"{path}.pid").exists()
    gone = threading.Event()
    thread, stopped = _serve_in_thread(path, echo, idle_timeout=60, alive=lambda: not gone.is_set())
    gone.set()
    thread.join(timeout=10)
    assert stopped == ["the SuperNode it serves is gone"]


def test_no_worker_and_a_worker_dying_mid_request_are_unavailable(tmp_path: Path) -> None:
    path = _short_socket(tmp_path)
    with pytest.raises(proto.WorkerUnavailable, match="no node worker at"):
        proto.call(path, {"kind": "hello"}, {})
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as server:  # accepts, reads, and closes without answering
        server.bind(str(path))
        server.listen(1)

        def die() -> None:
            conn, _ = server.accept()
            proto.recv_frame(conn)
            conn.close()

        thread = threading.Thread(target=die)
        thread.start()
        with pytest.raises(proto.WorkerUnavailable, match="went away"):
            proto.call(path, {"kind": "train"}, {"a": np.ones(4)})
        thread.join()
    path.unlink()


def _hello_request(node_config: dict) -> tuple[dict, dict]:
    import json

    from fedlora.federation import wire
    from fedlora.flower.node_worker import NodeState, reply_frame

    cfg = compose([*TINY, "model.max_length=32"])
    cfg["deployment"] = {"superlink": "test", "node_worker": True}
    packet = wire.encode_hello(["business", "entertainment", "politics", "sports", "tech"])
    header, arrays = reply_frame(packet, NodeState())  # the same layout as a request's content and state
    header = {"kind": "hello", "run": "1", "config": json.dumps(cfg), "node_config": node_config,
              "flwr_home": "/nonexistent", "content": header["content"], "state": header["state"]}
    return header, arrays


@pytest.mark.slow
def test_a_worker_process_answers_like_this_process_and_exits_with_its_supernode(tmp_path: Path) -> None:
    from fedlora.flower import node_worker

    path = _short_socket(tmp_path)
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # stands for SuperExec
    worker = proto.start_worker(path, str(ROOT), watch_pid=watched.pid, idle_timeout=300)
    try:
        assert proto.wait_until_listening(path, worker, 120), Path(f"{path}.log").read_text()
        for node_config in ({"partition-id": 1}, {"partition-id": 7, "rank": 0}):
            header, arrays = _hello_request(node_config)
            remote = proto.call(path, dict(header), dict(arrays))
            local = node_worker.handle(dict(header), dict(arrays))
            local[0].pop("traceback", None), remote[0].pop("traceback", None), remote[0].pop("seconds")
            assert remote[0] == local[0] and remote[1].keys() == local[1].keys()
        assert local[0]["ok"] is False and local[0]["error_class"] == "NodeConfigError"
        assert "partition-id=7" in local[0]["error"] and "rank=0" in local[0]["error"]
        header, arrays = _hello_request({"partition-id": 1})
        ok = proto.call(path, header, arrays)[0]
        assert ok["ok"] and ok["content"]["metrics"]["partition-id"] == 1
        assert ok["state"]["configs"]["fedlora-label-names"]["label-names"][0] == "business"
        watched.kill()
        watched.wait()
        worker.wait(timeout=30)  # it notices within a couple of seconds
        assert "the SuperNode it serves is gone" in Path(f"{path}.log").read_text()
        assert not path.exists()
    finally:
        for proc in (watched, worker):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def test_the_clientapp_reraises_the_workers_error_with_its_class_and_message() -> None:
    from flwr.app import Context, RecordDict

    from fedlora.flower.client_app import apply_reply

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    error = {"ok": False, "error_module": "fedlora.core.faults", "error_class": "InjectedFault",
             "error": "injected failure (round 2, client 1)", "traceback": ""}
    with pytest.raises(RuntimeError) as raised:
        apply_reply((error, {}), None, context)  # type: ignore[arg-type] # no reply on an error
    assert str(type(raised.value)) == "<class 'fedlora.core.faults.InjectedFault'>"  # what Flower reports
    assert str(raised.value) == "injected failure (round 2, client 1)"


def test_the_forwarding_clientapp_loads_no_torch() -> None:
    code = ("import sys, time; t = time.perf_counter(); import fedlora.flower.client_app; "
            "print(time.perf_counter() - t, [m for m in ('torch', 'transformers', 'peft') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    seconds, loaded = out.stdout.split(" ", 1)
    assert loaded.strip() == "[]", out.stdout
    time.sleep(0)  # (the import time is reported by bench/deploy_message.py)
    assert float(seconds) > 0


def test_the_clientapp_falls_back_when_no_worker_can_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from fedlora.flower import client_app

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    started = []

    def broken_worker(path: Path, app_dir: str, **_: Any) -> subprocess.Popen:
        started.append(path)
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])

    monkeypatch.setattr(proto, "start_worker", broken_worker)
    with caplog.at_level("INFO", logger="flwr"):
        assert client_app._via_worker({"kind": "train"}, {}, node_id=12345) is None
    assert len(started) == 1 and started[0] == proto.socket_path(str(tmp_path), 12345, client_app._app_dir())
    assert "(exit status 3)" in caplog.text
    assert caplog.text.count("training in this flwr-clientapp process") == 1


@pytest.mark.parametrize("error,traced", [("fault", False), ("bug", True)])
def test_an_injected_fault_comes_back_without_a_traceback_a_bug_with_one(monkeypatch: pytest.MonkeyPatch,
                                                                         error: str, traced: bool) -> None:
    # The console of a run with faults.fail_prob=1 showed every injected failure's traceback (bench/probes.py
    # "every client fails every round"); a real error keeps its traceback for whoever debugs it.
    from fedlora.core.faults import InjectedFault
    from fedlora.flower import node_worker

    def train(*_: object, **__: object) -> None:
        raise InjectedFault("injected failure (round 1, client 0)") if error == "fault" else ValueError("a bug")

    monkeypatch.setattr(node_worker, "_packet", lambda header, arrays: None)
    monkeypatch.setattr(node_worker, "train", train)
    header = {"kind": "train", "run": "1", "node_config": {}, "state": {"records": [], "configs": {}}}
    reply, _ = node_worker.handle(header, {}, settings=object())  # type: ignore[arg-type]
    assert reply["ok"] is False and reply["error_class"] == ("InjectedFault" if error == "fault" else "ValueError")
    assert ("Traceback (most recent call last)" in reply["traceback"]) is traced


def test_a_node_keeps_its_residual_and_its_copies_on_disk_and_a_new_process_reloads_them(tmp_path: Path) -> None:
    import torch

    from fedlora.flower.node_worker import NodeState, StateStore

    store = StateStore(NodeState(), tmp_path)
    residual = {"enc.q.lora_B.weight": torch.full((2, 2), 0.5)}
    copies = {3: {"enc.q.lora_B.weight": torch.ones(2, 2)}, 5: {"enc.q.lora_B.weight": torch.zeros(2, 2)}}
    store.save_residual(3, residual)
    store.save_views(5, copies)  # round 5's message; the residual is still round 3's
    assert sorted(store.views(0)) == [3, 5] and store.residual(0) is not None
    fresh = StateStore(NodeState(), tmp_path)  # a new process: nothing in context.state
    assert fresh.views(0) == {} and fresh.residual(0) is None  # a fresh run reads no file
    assert fresh.residual(4) is not None and sorted(fresh.views(4)) == []  # resumed after round 4: round 3's file
    reloaded = fresh.views(5)
    assert sorted(reloaded) == [3, 5] and torch.equal(reloaded[3]["enc.q.lora_B.weight"], torch.ones(2, 2))
    assert torch.equal(fresh.residual(5)["enc.q.lora_B.weight"], residual["enc.q.lora_B.weight"])  # type: ignore[index]


def test_a_node_keeps_its_own_b_and_head_on_disk_apart_from_its_residual(tmp_path: Path) -> None:
    import torch

    from fedlora.flower.node_worker import NodeState, StateStore

    store = StateStore(NodeState(), tmp_path)
    own = {2: {"enc.q.lora_B.weight": torch.ones(2, 2), "classifier.bias": torch.zeros(3)},
           3: {"enc.q.lora_B.weight": torch.full((2, 2), 2.0), "classifier.bias": torch.ones(3)}}
    store.save_personal(3, own)  # FedSA-LoRA: round 3's and the newest before it
    assert sorted(store.personal(0)) == [2, 3] and store.residual(0) is None  # its own are not a residual
    fresh = StateStore(NodeState(), tmp_path)  # a new process of a run resumed after round 3
    reloaded = fresh.personal(3)
    assert sorted(reloaded) == [2, 3] and torch.equal(reloaded[3]["classifier.bias"], torch.ones(3))
    assert fresh.residual(3) is None and fresh.views(3) == {}
    assert fresh.personal(2) == {}  # resumed after round 2: no file of round 2 or before


def test_a_node_saves_its_own_model_in_its_state_directory_apart_from_its_state_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fedlora.flower.node_worker import NodeState, StateStore
    from fedlora.results.checkpoint import load_client_state

    store = StateStore(NodeState(), tmp_path / "3")
    assert store.model_dir() == tmp_path / "3" / "adapter"  # beside its state: in simulation <run>/client_state/3
    store.model_dir().mkdir(parents=True)
    save_file({}, str(store.model_dir() / "adapter_model.safetensors"))
    assert load_client_state(tmp_path / "3", at_most=99) is None  # not taken for a round's state file
