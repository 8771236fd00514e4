"""Checkpoints of a federated run, and the client-side state files, written atomically.

Server checkpoint, after every round, in ``<run_dir>/checkpoint/``::

    LATEST                      the name of the newest complete round directory (replaced atomically)
    round_00003/                one round: written under a temporary name, then renamed
        state.safetensors       global adapter ("adapter/..."), strategy state ("strategy/..."),
                                the torch RNG state ("rng/torch")
        meta.json               round, client ranks, acked merges, best accuracy, elapsed time,
                                Python and NumPy RNG states, number of base merges, and the
                                SHA-256 of state.safetensors and metrics.jsonl
        metrics.jsonl           metrics.jsonl as it was after this round
    merges/merge_00002.safetensors
                                base merges (FLoRA), each written once (they never change), named
                                as on the wire (fedlora.core.lora_math.merges_to_tensors), with its
                                SHA-256 in merge_00002.sha256

:func:`verify_checkpoint` reads and checks all of it before a resume starts anything.

A reader follows ``LATEST``, so a kill at any moment leaves the previous complete checkpoint
readable: a round directory becomes visible only by a rename, ``LATEST`` only by
``os.replace``. Older round directories are removed after ``LATEST`` moves on.

Client state (ComPEFT's error-feedback residual) lives on the client's side:
``<state_dir>/round_00003.safetensors``, the state after the client trained in that round. The
two newest files are kept: a kill can leave at most one file newer than the server's checkpoint
(the interrupted round), so the newest file at or before the checkpoint round is always there.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedlora.core.lora_math import merges_to_tensors, tensors_to_merges
from fedlora.core.types import AdapterState, BaseMerge

CHECKPOINT_DIR = "checkpoint"
CHECKED_FILES = ("state.safetensors", "metrics.jsonl")  # a round's files whose SHA-256 meta.json records
CLIENT_STATE_DIR = "client_state"
_LATEST = "LATEST"
_KEEP_CLIENT_FILES = 2


@dataclass
class Checkpoint:
    """Everything the server needs to continue a run after round ``round``."""

    round: int
    adapter: AdapterState
    strategy_state: dict[str, torch.Tensor]
    merges: list[BaseMerge]
    ranks: dict[int, int]
    acked: dict[int, int] = field(default_factory=dict)
    best: float = 0.0
    elapsed: float = 0.0
    metrics: list[str] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    # downlink compression: client -> (round, the copy of its start it holds)
    views: dict[int, tuple[int, AdapterState]] = field(default_factory=dict)
    # controlled averaging (compression=scafcom): the server's control variate c
    control: AdapterState = field(default_factory=dict)
    # downlink=svd: module -> the part of the merges not sent yet (fedlora.compression.merges)
    merge_residual: AdapterState = field(default_factory=dict)


# -- files ------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write(tmp, data)
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``safetensors`` save through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- random-number state ----------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, Any], torch.Tensor]:
    """Return the Python and NumPy RNG states (JSON-able) and the torch CPU RNG state."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return ({"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]},
            torch.get_rng_state())


def restore_rng(states: dict[str, Any], torch_state: torch.Tensor | None) -> None:
    """Inverse of :func:`capture_rng`."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if torch_state is not None:
        torch.set_rng_state(torch_state)


# -- server checkpoint ------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, ckpt: Checkpoint, merges_from: int = 0) -> Path:
    """Write ``ckpt`` under ``run_dir/checkpoint`` atomically and return its round directory.

    ``merges_from``: merges with a lower index are already on disk from an earlier checkpoint
    of this run (they never change); later ones are (re)written.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    (root / "merges").mkdir(parents=True, exist_ok=True)
    for index in range(merges_from, len(ckpt.merges)):
        tensors = merges_to_tensors([(index, ckpt.merges[index])])
        path = root / "merges" / f"merge_{index:05d}.safetensors"
        save_tensors_atomic(path, tensors)
        write_atomic(path.with_suffix(".sha256"), sha256(path).encode())  # checked before a resume
    name = f"round_{ckpt.round:05d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    rng, torch_rng = capture_rng()
    tensors = {f"adapter/{k}": v for k, v in ckpt.adapter.items()}
    tensors.update({f"strategy/{k}": v for k, v in ckpt.strategy_state.items()})
    tensors.update({f"view/{cid}/{k}": v for cid, (_, view) in ckpt.views.items() for k, v in view.items()})
    tensors.update({f"control/{k}": v for k, v in ckpt.control.items()})
    tensors.update({f"merge_residual/{k}": v for k, v in ckpt.merge_residual.items()})
    tensors["rng/torch"] = torch_rng
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()},
              str(tmp / "state.safetensors"))
    _write(tmp / "metrics.jsonl", "".join(line + "\n" for line in ckpt.metrics).encode())
    meta = {"round": ckpt.round, "ranks": {str(k): v for k, v in sorted(ckpt.ranks.items())},
            "acked": {str(k): v for k, v in sorted(ckpt.acked.items())}, "best": ckpt.best,
            "view_rounds": {str(k): r for k, (r, _) in sorted(ckpt.views.items())},
            "elapsed": ckpt.elapsed, "num_merges": len(ckpt.merges), "rng": rng,
            "sha256": {name: sha256(tmp / name) for name in CHECKED_FILES}}
    _write(tmp / "meta.json", json.dumps(meta).encode())
    with open(tmp / "state.safetensors", "rb") as f:
        os.fsync(f.fileno())
    final = root / name
    if final.exists():  # left by an attempt killed before it moved LATEST
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    write_atomic(root / _LATEST, name.encode())
    for old in root.glob("round_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(run_dir: Path) -> list[str]:
    """What is damaged in ``run_dir``'s newest checkpoint, one line per file (empty: nothing).

    Each file is read as a resume would read it, and compared with the SHA-256 recorded when it was
    written (checkpoints written before checksums are only read): ``LATEST``, the round's
    ``meta.json``, ``state.safetensors`` and ``metrics.jsonl``, every base merge, and each client's
    newest state file at or before the round (simulation).
    """
    root, latest = Path(run_dir) / CHECKPOINT_DIR, latest_marker(run_dir)
    if not latest.is_file():
        return [f"{latest} is missing"]
    folder = _latest_folder(run_dir)
    if not (folder / "meta.json").is_file():
        return [f"{latest} names {folder.name!r}, which holds no meta.json"]
    try:
        meta = json.loads((folder / "meta.json").read_text())
        round_, merges = int(meta["round"]), int(meta["num_merges"])
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{folder / 'meta.json'} cannot be read ({type(exc).__name__}: {str(exc)[:120]})"]
    recorded = meta.get("sha256") or {}
    problems = [_check_file(folder / name, recorded.get(name)) for name in CHECKED_FILES]
    for index in range(merges):
        path = root / "merges" / f"merge_{index:05d}.safetensors"
        side = path.with_suffix(".sha256")
        problems.append(_check_file(path, side.read_text().strip() if side.is_file() else None))
    for state_dir in sorted((Path(run_dir) / CLIENT_STATE_DIR).glob("*")):
        newest = _newest_client_file(state_dir, round_)
        if newest is not None:
            problems.append(_check_file(newest, None))
    return [p for p in problems if p]


def _check_file(path: Path, expected_sha256: str | None) -> str | None:
    """Why ``path`` cannot serve a resume (missing, changed, unreadable), or ``None``."""
    if not path.is_file():
        return f"{path} is missing"
    if expected_sha256 is not None and sha256(path) != expected_sha256:
        return f"{path} differs from what was written (its SHA-256 does not match): it was changed or damaged"
    try:
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError:
                        return f"{path} line {number} is not JSON"
    except Exception as exc:  # noqa: BLE001 - whatever the reader raises, the file cannot be used
        return f"{path} cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def latest_marker(run_dir: Path) -> Path:
    """The file naming ``run_dir``'s newest complete checkpoint (it exists once round 0 is saved)."""
    return Path(run_dir) / CHECKPOINT_DIR / _LATEST


def _latest_folder(run_dir: Path) -> Path:
    """The round directory that :func:`latest_marker` names (the marker must exist)."""
    return Path(run_dir) / CHECKPOINT_DIR / latest_marker(run_dir).read_text(errors="replace").strip()


def checkpoint_round(run_dir: Path) -> int | None:
    """The round of ``run_dir``'s newest complete checkpoint (``None``: there is none)."""
    if not has_checkpoint(run_dir):
        return None
    return int(json.loads((_latest_folder(run_dir) / "meta.json").read_text())["round"])


def has_checkpoint(run_dir: Path) -> bool:
    """Return whether ``run_dir`` holds a complete checkpoint."""
    return latest_marker(run_dir).is_file() and (_latest_folder(run_dir) / "meta.json").is_file()


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read the newest complete checkpoint of ``run_dir`` (raises ``FileNotFoundError``)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not has_checkpoint(run_dir):
        raise FileNotFoundError(f"{root} holds no complete checkpoint")
    folder = _latest_folder(run_dir)
    meta = json.loads((folder / "meta.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    merges = [_load_merge(root / "merges" / f"merge_{index:05d}.safetensors", index)
              for index in range(int(meta["num_merges"]))]
    rng = dict(meta.get("rng", {}))
    rng["torch"] = tensors.get("rng/torch")
    views: dict[int, tuple[int, AdapterState]] = {}
    for cid, view_round in meta.get("view_rounds", {}).items():
        prefix = f"view/{cid}/"
        views[int(cid)] = (int(view_round), {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return Checkpoint(
        round=int(meta["round"]),
        adapter={k[len("adapter/"):]: v for k, v in tensors.items() if k.startswith("adapter/")},
        strategy_state={k[len("strategy/"):]: v for k, v in tensors.items() if k.startswith("strategy/")},
        merges=merges, ranks={int(k): int(v) for k, v in meta["ranks"].items()},
        acked={int(k): int(v) for k, v in meta["acked"].items()}, best=float(meta["best"]),
        elapsed=float(meta["elapsed"]), metrics=(folder / "metrics.jsonl").read_text().splitlines(), rng=rng,
        views=views, control={k[len("control/"):]: v for k, v in tensors.items() if k.startswith("control/")},
        merge_residual={k[len("merge_residual/"):]: v for k, v in tensors.items() if k.startswith("merge_residual/")},
    )


def _load_merge(path: Path, index: int) -> BaseMerge:
    """One merge file; files written before merges carried their index name tensors ``<module>|A``."""
    raw = load_file(str(path))
    named = {(k if k.count("|") == 2 else f"{index}|{k}"): v for k, v in raw.items()}
    ((_, merge),) = tensors_to_merges(named)
    return merge


# -- client state -----------------------------------------------------------------------------
def save_client_state(state_dir: Path, server_round: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write a client's state after ``server_round``; keep the two newest files."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(state_dir / f"round_{server_round:05d}.safetensors", tensors)
    files = sorted(state_dir.glob("round_*.safetensors"))
    for old in files[:-_KEEP_CLIENT_FILES]:
        old.unlink(missing_ok=True)


def _newest_client_file(state_dir: Path, at_most: int) -> Path | None:
    best = None
    for path in sorted(Path(state_dir).glob("round_*.safetensors")):
        if int(path.stem.split("_")[1]) <= at_most:
            best = path
    return best


def load_client_state(state_dir: Path, at_most: int) -> dict[str, torch.Tensor] | None:
    """Return the client's state of the newest round ``<= at_most``, or ``None``."""
    best = _newest_client_file(state_dir, at_most)
    return load_file(str(best)) if best is not None else None
