"""Run directories that two runs never share, and the marks a run leaves in its directory.

``conf/config.yaml`` names a run's directory ``${claim:runs/<date>_<time>_<name>}``: the ``claim``
resolver creates the directory atomically (``mkdir`` fails when it exists) and, when another run
took that name first (two runs started in the same second), takes ``<name>-2``, ``<name>-3``, ...
instead. A process claims each name once (Hydra resolves the directory more than once, and every
job of a sweep shares the sweep's directory), so resolving again returns the same directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

FAILED = "FAILED"
_claimed: dict[str, str] = {}


def claim(candidate: str) -> str:
    """Create a fresh directory named ``candidate`` (or ``candidate-<n>``) and return its path."""
    if candidate in _claimed:
        return _claimed[candidate]
    path, n = Path(candidate), 1
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            path.mkdir()
            break
        except FileExistsError:
            n += 1
            path = Path(f"{candidate}-{n}")
    _claimed[candidate] = str(path)
    return str(path)


def release_unused(used: Path) -> list[Path]:
    """Remove the directories this process claimed and does not use: empty, and neither ``used`` (the
    job's output directory) nor one of its parents. Return them.

    OmegaConf dereferences an interpolation it merges a config over, so an experiment that sets its own
    ``hydra.sweep.dir`` (``experiment=privacy``: ``runs/privacy_<time>``) makes every composition of a
    job claim ``config.yaml``'s ``runs/sweep_<time>`` too, which would stay behind empty. The name stays
    remembered: a later resolution in this process answers it without creating the directory again.
    """
    used = used.resolve()
    released = []
    for path in sorted({Path(p).resolve() for p in _claimed.values()}):
        if path == used or path in used.parents:
            continue
        try:
            path.rmdir()  # only an empty directory: a claimed one that something wrote into stays
        except OSError:
            continue
        released.append(path)
    return released


NAME_LIMIT = 200  # characters of a job's directory name (file systems allow 255 bytes; "-<n>" may follow)


def fit_name(name: str) -> str:
    """``name`` when it is short enough for a directory, else its start and a hash of all of it.

    A sweep names each job's directory after its overrides (``hydra.job.override_dirname``); with many
    overrides that passes the file system's 255-byte limit and the job dies with "File name too long".
    The hash keeps two long names that share their start apart, and the same name maps to the same
    directory on every run (the overrides themselves are in each job's ``config.yaml``).
    """
    if len(name.encode()) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    head = name.encode()[:NAME_LIMIT - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


# Hydra flags that only print (the config, Hydra's info, help): the directory names they resolve are
# not claimed, so `fedlora --cfg job` leaves no empty runs/sweep_<time> behind.
PRINT_ONLY = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help")


def register_resolvers(argv: list[str] | None = None) -> None:
    """Make ``${claim:...}`` available to Hydra's config (call before composing it); with a print-only
    flag in ``argv`` it names the directory without creating it."""
    if not OmegaConf.has_resolver("claim"):
        printing = any(a in PRINT_ONLY or a.startswith("--cfg=") for a in (argv or []))
        OmegaConf.register_new_resolver("claim", str if printing else claim)
    if not OmegaConf.has_resolver("fit_name"):
        OmegaConf.register_new_resolver("fit_name", fit_name)


def mark_failed(run_dir: Path, text: str) -> None:
    """Leave ``FAILED`` with ``text`` (the traceback or the config errors) in ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).write_text(text)
