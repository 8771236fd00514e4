"""Throw bad inputs at the real ``fedlora`` command and count how many it handles well.

    .venv/bin/python bench/probes.py                      # every probe (about 15 minutes on 2 cores)
    .venv/bin/python bench/probes.py --only data,resume   # some groups
    .venv/bin/python bench/probes.py --json bench/results/<date>/probes.json

A probe runs the command as a user would (a fresh process, the repository's ``conf/``) and is
**handled well** when the command ends with the expected exit status, within its time limit, with
a message that contains the expected text (the field or file, and the fix), without a Python
traceback, and passes the probe's own extra check (for example: the refused run directory is left
untouched). It prints one line per probe and ``N probes, M handled well``.

Groups: ``config`` (one out-of-range or wrongly typed value per field of
``fedlora.config.fields.FIELDS``, and the combinations that make no sense), ``data`` (malformed data
files), ``checkpoint`` (damaged checkpoints offered to ``resume=``), ``resume`` (refused and finished
runs), ``runtime`` (Ctrl-C in a round, two runs at once, a run whose every client fails, an
unreachable Ray cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, child_env, compose  # noqa: E402

FEDLORA = str(Path(sys.executable).parent / "fedlora")
TINY = ["num_clients=3", "num_rounds=2", "train.local_steps=2", "train.batch_size=8", "data.max_test_examples=64",
        "ranks.tiers=[2,4,8]", "partition.min_partition_size=5", "logging.tensorboard=false"]


@dataclass
class Probe:
    """One bad input: how to run it and what handling it well means."""

    group: str
    name: str
    args: Callable[[Path], list[str]]  # given a scratch directory, the command-line arguments
    expect: tuple[str, ...] = ()  # text the output must contain
    status: int = 2
    limit: float = 90.0  # seconds
    check: Callable[[Path, str], str | None] | None = None  # extra check: why it is not handled well
    signal_after: Callable[[Path], bool] | None = None  # runtime probes: send SIGINT to the group when true


@dataclass
class Outcome:
    probe: str
    group: str
    handled_well: bool
    why: str
    status: int | None
    seconds: float
    output_tail: str = field(default="", repr=False)


def run_probe(probe: Probe, scratch: Path) -> Outcome:
    """Run one probe in its own scratch directory."""
    args = probe.args(scratch)
    has_dir = any(a.startswith(("hydra.run.dir=", "resume=")) for a in args)
    cmd = [FEDLORA, *args, *([] if has_dir else [f"hydra.run.dir={scratch / 'run'}"])]
    t0 = time.monotonic()
    log_path = scratch / "output.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)
        status: int | None = None
        try:
            while proc.poll() is None and time.monotonic() - t0 < probe.limit:
                if probe.signal_after is not None and probe.signal_after(scratch):
                    os.killpg(proc.pid, signal.SIGINT)
                    probe.signal_after = None
                time.sleep(0.2)
            status = proc.poll()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - t0
    output = log_path.read_text(errors="replace")
    why = judge(probe, status, output, seconds, scratch)
    return Outcome(f"{probe.group}/{probe.name}", probe.group, why is None, why or "ok", status, round(seconds, 1),
                   output[-1500:])


def judge(probe: Probe, status: int | None, output: str, seconds: float, scratch: Path) -> str | None:
    """Why the probe was not handled well, or ``None``."""
    if status is None:
        return f"still running after {probe.limit:.0f} s"
    if status != probe.status:
        return f"exit status {status}, expected {probe.status}"
    if "Traceback (most recent call last)" in output:
        return "a Python traceback"
    missing = [text for text in probe.expect if text not in output]
    if missing:
        return f"the output lacks {missing}"
    return probe.check(scratch, output) if probe.check else None


# -- the probes ------------------------------------------------------------------------------------------
def config_probes() -> list[Probe]:
    """One bad value per field, and the combinations that make no sense."""
    from fedlora.config.fields import FIELDS

    probes = []
    for f in FIELDS:
        value: Any = ({"int": 2.5, "number": "abc", "bool": "maybe", "str": 3}[f.kind] if f.low is None or
                      f.kind in ("bool", "str") else (f.low if f.low_open else f.low - 1))
        # a bool by type only: 0 == False would otherwise turn a bound of 0 into "false"
        text = (str(value).lower() if isinstance(value, bool) else
                repr(value) if isinstance(value, str) else str(value))
        context = (["task=causal_lm"] if f.path == "model.base_seed" else
                   ["privacy=dp_sgd"] if f.path.startswith("privacy.") and f.path != "privacy.kind" else [])
        probes.append(Probe("config", f"{f.path}={text}", lambda _, p=f.path, t=text, c=context: [*c, f"{p}={t}"],
                            expect=(f"{f.path}=",)))
    combos = [
        ("unknown strategy", ["strategy._target_=strategies.nope.Nope"], "conf/strategy"),
        ("unknown transport", ["+transport=pigeon"], "transport='pigeon'"),
        ("compression on the centralized bound", ["strategy=centralized", "compression=compeft"], "compression=none"),
        ("faults on the centralized bound", ["strategy=centralized", "faults=flaky"], "faults=none"),
        ("min_fit_clients above num_clients", ["num_clients=3", "min_fit_clients=5"], "cannot exceed num_clients=3"),
        ("a rank above the layer width", ["ranks.tiers=[4,1000]"], "width 384"),
        ("explicit ranks of the wrong length", ["ranks.policy=explicit", "ranks.explicit=[4,8]"], "one rank per"),
        ("an unknown model offline", ["model.name=no-such-model"], "HF_HUB_OFFLINE=1"),
        ("no layer matches the target modules", ["model.target_modules=[nope]"], "query, value"),
        ("more clients than training articles", ["num_clients=5000", "partition=iid"], "use at most 1781 clients"),
        ("a Dirichlet minimum no draw can meet", ["partition.min_partition_size=500"], "500 = 5000 examples"),
        ("GPU clients on a machine without a GPU", ["simulation=gpu"], "no client could start"),
        ("more CPUs per client than the machine has", ["simulation.client_resources.num_cpus=64"],
         "no client could start"),
        ("a strategy hyperparameter", ["strategy=lora_fair", "strategy.lam=-1"], "strategy.lam=-1"),
        ("a compression hyperparameter", ["compression=compeft", "compression.density=20"], "not a percentage"),
        ("the wrong model for the task", ["task=causal_lm", "model=minilm"], "model=tiny_decoder"),
        ("error feedback on FLoRA's fresh factors", ["strategy=flora", "compression=compeft",
                                                      "compression.error_feedback=true"], "fresh LoRA factors"),
        ("client-level DP with a non-linear strategy", ["privacy=dp_fedavg", "strategy=flora"],
         "not linear in what clients send"),
        ("client-level DP on the centralized bound", ["privacy=dp_fedavg", "strategy=centralized"],
         "no clients to protect"),
        ("both a privacy budget and a noise multiplier", ["privacy=dp_sgd", "privacy.noise_multiplier=1.0"],
         "set exactly one of the two"),
        ("secure aggregation with a non-linear strategy", ["privacy=secagg", "strategy=flora"],
         "not linear in what clients send"),
        ("secure aggregation with an even number of shares", ["privacy=secagg", "secure_aggregation.num_shares=4"],
         "use an odd number"),
        ("clients that come and go under client-level DP", ["participation=bernoulli", "privacy=dp_fedavg"],
         "use participation=uniform"),
        ("participation probabilities without Bernoulli participation", ["participation.probabilities=[0.5]"],
         "only participation=bernoulli"),
        ("FedAU with a strategy that aggregates products", ["participation.fedau=true", "strategy=lora_fair"],
         "no per-client rescaling reaches"),
    ]
    probes += [Probe("config", name, lambda _, a=a: a, expect=(e,)) for name, a, e in combos]
    return probes


def _file(name: str, content: str | bytes) -> Callable[[Path], Path]:
    def write(scratch: Path) -> Path:
        path = scratch / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    return write


def data_probes() -> list[Probe]:
    """Malformed data files, as a user's local dataset."""
    table = ["data=local_file", "num_clients=2", "partition=iid"]
    instr = ["task=causal_lm", "data=instructions_file", "num_clients=2", "partition=iid"]
    rows = "".join(f"article {i},sports\n" for i in range(10))
    cases = [
        ("an empty csv", table, _file("d.csv", ""), "is empty"),
        ("a header and no rows", table, _file("d.csv", "text,label\n"), "has a header but no rows"),
        ("one row", table, _file("d.csv", "text,label\none,sports\n"), "use at most 1 clients"),
        ("latin-1 bytes", table, _file("d.csv", "text,label\ncaf\xe9,x\n".encode("latin-1")), "is not UTF-8"),
        ("a JSON object, not records", table, _file("d.json", '{"text": "a", "label": "b"}'), "a JSON object"),
        ("missing labels", table, _file("d.csv", "text,label\n" + rows + "x,\n"), "have no text or no label"),
        ("missing texts", table, _file("d.csv", "text,label\n" + rows + ",sports\n"), "have no text or no label"),
        ("numbers and text as labels", table,
         _file("d.jsonl", "".join(json.dumps({"text": f"a{i}", "label": [1, "x"][i % 2]}) + "\n" for i in range(10))),
         "the labels mix numbers"),
        ("columns that are not there", [*table, "data.text_column=body"], _file("d.csv", "text,label\n" + rows),
         "data.text_column='body'"),
        ("an instruction without a response", instr,
         _file("i.jsonl", "".join(json.dumps({"instruction": f"q{i}", "input": "", "output": None if i == 3 else "a"})
                                  + "\n" for i in range(10))), "record(s) 4 have no 'instruction' or no 'output'"),
        ("instructions as one JSON object", instr, _file("i.json", '{"instruction": "a", "output": "b"}'),
         "holds one JSON object"),
        ("instructions in neither layout", instr,
         _file("i.jsonl", "".join(json.dumps({"q": "a", "a": "b"}) + "\n" for _ in range(10))), "fit no instruction"),
    ]
    return [Probe("data", name, lambda s, a=a, w=w: [*a, f"data.name={w(s)}"], expect=(e,))
            for name, a, w, e in cases]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _make_run(scratch: Path, num_rounds: int, finished: bool) -> Path:
    """A run directory with a checkpoint of its round 1 (and a summary when ``finished``)."""
    import torch
    import yaml

    from fedlora.core.types import LoraPair
    from fedlora.results import checkpoint as ck

    run = scratch / "done"
    run.mkdir()
    cfg = compose([*TINY, f"num_rounds={num_rounds}"])
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "output_dir": str(run)}))
    last = num_rounds if finished else 1
    merge = {"m": LoraPair(torch.ones(2, 3), torch.ones(4, 2))}
    ck.save_checkpoint(run, ck.Checkpoint(round=last, adapter={"w": torch.zeros(2)}, strategy_state={},
                                          merges=[merge], ranks={0: 2, 1: 4, 2: 8},
                                          metrics=[json.dumps({"round": r}) for r in range(last + 1)]))
    ck.save_client_state(run / ck.CLIENT_STATE_DIR / "0", last, {"x": torch.ones(3)})
    if finished:
        (run / "summary.json").write_text(json.dumps({"final_test_accuracy": 0.5, "primary_metric": "test_accuracy"}))
    (run / "main.log").write_text("the log of the run\n")  # Hydra's job log, which every run has
    (scratch / "before.json").write_text(json.dumps({k: v.hex() for k, v in _snapshot(run).items()}))
    return run


def _untouched(scratch: Path, output: str) -> str | None:  # noqa: ARG001
    before = {k: bytes.fromhex(v) for k, v in json.loads((scratch / "before.json").read_text()).items()}
    return None if _snapshot(scratch / "done") == before else "the run directory was changed"


def checkpoint_probes() -> list[Probe]:
    """A run's checkpoint damaged in each way, offered to resume=."""
    def damaged(how: str) -> Callable[[Path], list[str]]:
        def setup(scratch: Path) -> list[str]:
            run = _make_run(scratch, num_rounds=3, finished=False)
            root = run / "checkpoint"
            target = {"meta": root / "round_00001" / "meta.json", "state": root / "round_00001" / "state.safetensors",
                      "metrics": root / "round_00001" / "metrics.jsonl",
                      "merge": root / "merges" / "merge_00000.safetensors", "latest": root / "LATEST",
                      "client": run / "client_state" / "0" / "round_00001.safetensors"}[how]
            data = target.read_bytes()
            target.write_bytes({"meta": b"{garbage", "latest": b"round_00077"}.get(how, data[: len(data) // 2]))
            (scratch / "before.json").write_text(json.dumps({k: v.hex() for k, v in _snapshot(run).items()}))
            return [f"resume={run}"]
        return setup

    return [Probe("checkpoint", f"damaged {how}", damaged(how), expect=("the checkpoint cannot be resumed from",),
                  check=_untouched) for how in ("meta", "state", "metrics", "merge", "latest", "client")]


def resume_probes() -> list[Probe]:
    """Resumes that must be refused, or that have nothing to do."""
    def no_checkpoint(scratch: Path) -> list[str]:
        run = scratch / "done"
        run.mkdir()
        (run / "config.yaml").write_text("seed: 0\n")
        (run / "main.log").write_text("the log of the run\n")
        (scratch / "before.json").write_text(json.dumps({k: v.hex() for k, v in _snapshot(run).items()}))
        return [f"resume={run}"]

    return [
        Probe("resume", "a directory that does not exist", lambda s: [f"resume={s / 'nowhere'}"],
              expect=("no such directory",)),
        Probe("resume", "a run without a checkpoint", no_checkpoint, expect=("has no complete checkpoint",),
              check=_untouched),
        Probe("resume", "a finished run", lambda s: [f"resume={_make_run(s, 2, finished=True)}"], status=0,
              expect=("nothing to resume",), check=_untouched),
    ]


def runtime_probes() -> list[Probe]:
    """Things that happen while a run runs."""
    def two_at_once(scratch: Path) -> list[str]:
        # a second command, started now, bound to the same directory name as the probe's own
        subprocess.Popen([FEDLORA, "num_clients=0", f"hydra.run.dir=${{claim:{scratch / 'same'}}}"], cwd=ROOT,
                         env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return ["num_clients=0", f"hydra.run.dir=${{claim:{scratch / 'same'}}}"]

    def two_dirs(scratch: Path, output: str) -> str | None:  # noqa: ARG001
        time.sleep(20)  # let the other command finish
        names = sorted(p.name for p in scratch.iterdir() if p.name.startswith("same"))
        return None if names == ["same", "same-2"] else f"directories {names}"

    def in_round_1(scratch: Path) -> bool:
        latest = scratch / "run" / "checkpoint" / "LATEST"
        return latest.is_file() and latest.read_text() == "round_00000" and time.sleep(2.0) is None

    return [
        Probe("runtime", "Ctrl-C during a round", lambda _: [*TINY, "num_rounds=3"], status=130, limit=300,
              expect=("stopped by SIGINT; round 0 is its last complete round; resume with",),
              signal_after=in_round_1),
        Probe("runtime", "two runs started at once", two_at_once, expect=("num_clients=0",), check=two_dirs),
        Probe("runtime", "every client fails every round", lambda _: [*TINY, "faults.fail_prob=1.0"], status=1,
              limit=300, expect=("no round aggregated an update",)),
        Probe("runtime", "a Ray cluster that cannot be reached", lambda _: [*TINY, "simulation.address=127.0.0.1:9"],
              status=1, limit=120, expect=("simulation.address='127.0.0.1:9': no Ray cluster answers there",)),
    ]


GROUPS = {"config": config_probes, "data": data_probes, "checkpoint": checkpoint_probes, "resume": resume_probes,
          "runtime": runtime_probes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated groups of {list(GROUPS)}")
    parser.add_argument("--json", default=None, help="write every outcome to this file")
    args = parser.parse_args(argv)
    probes = [p for group in args.only.split(",") for p in GROUPS[group]()]
    outcomes = []
    for probe in probes:
        with tempfile.TemporaryDirectory() as scratch:
            outcome = run_probe(probe, Path(scratch))
        outcomes.append(outcome)
        mark = "ok " if outcome.handled_well else "BAD"
        print(f"{mark} {outcome.probe:70s} {outcome.seconds:6.1f} s  {'' if outcome.handled_well else outcome.why}",
              flush=True)
    well = sum(o.handled_well for o in outcomes)
    print(f"{len(outcomes)} probes, {well} handled well")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"probes": len(outcomes), "handled_well": well,
                                               "outcomes": [o.__dict__ for o in outcomes]}, indent=1))
    return 0 if well == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
