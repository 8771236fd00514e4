"""Every shipped config composes and validates; bad configs fail with field, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import CONF_DIR, compose, run_fedlora

from fedlora.config.settings import RankSettings, Settings
from fedlora.config.validate import validate
from fedlora.core.errors import ConfigError

GROUPS = {p.name: sorted(q.stem for q in p.glob("*.yaml")) for p in Path(CONF_DIR).iterdir() if p.is_dir()}
REQUIRED_NAME = {("model", "hf"), ("data", "local_file"), ("data", "hub"), ("data", "instructions_file"),
                 ("data", "instructions_hub")}  # need a user value
HUB_MODELS = {("model", "tinyllama"), ("model", "qwen2_5_0_5b"), ("model", "llama3_2_1b")}  # offline=false
CAUSAL_ONLY = {("model", "tiny_decoder"), ("data", "synthetic_instructions"), *HUB_MODELS}
# options that need another setting: FedSA-LoRA has no global model, its clients evaluate their own
NEEDS = {("strategy", "fedsa_lora"): ["data.client_test_fraction=0.2"],
         ("downlink", "svd"): ["strategy=flora"]}  # it compresses base merges, which FLoRA sends


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in sorted(GROUPS.items()) for o in opts
                                          if g != "experiment" and (g, o) not in REQUIRED_NAME])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    prefix = "+" if group == "method" else ""  # `method` has no default: it is added by sweeps
    task = ["task=causal_lm"] if (group, option) in CAUSAL_ONLY else []
    if (group, option) == ("simulation", "gpu"):
        import torch

        if not torch.cuda.is_available():  # without a GPU, declare one to Ray (else: "no client could start")
            task.append("simulation.num_gpus=1")
    cfg = compose([*task, f"{prefix}{group}={option}", *NEEDS.get((group, option), [])])
    if (group, option) in HUB_MODELS:  # offline (the tests' setting) a hub model cannot even be probed
        with pytest.raises(ConfigError, match=r"(?s)model\.name=.*HF_HUB_OFFLINE=1.*offline=false"):
            validate(cfg)
        assert cfg["model"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
        return
    validate(cfg)
    if group == "method":
        strategy, _, compression = option.partition("_compeft")
        if strategy == "centralized":  # the bound: one pooled learner, FedAvg of its single update
            assert cfg["transport"] == "pooled" and cfg["strategy"]["_target_"] == "strategies.fedavg.FedAvg"
        else:
            assert cfg["strategy"]["_target_"].split(".")[1] == strategy
        assert ("compeft" in cfg["compression"].get("_target_", "")) == (option.endswith("_compeft"))


@pytest.mark.parametrize("experiment", GROUPS.get("experiment", []))
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    validate(compose([f"experiment={experiment}"]))


BAD = [
    (["num_clients=0"], "num_clients=0", "positive integer"),
    (["num_clients=-3"], "num_clients=-3", "positive integer"),
    (["fraction_train=0"], "fraction_train=0", "(0, 1]"),
    (["fraction_train=1.5"], "fraction_train=1.5", "(0, 1]"),
    (["partition.alpha=0"], "partition.alpha=0", "> 0"),
    (["partition.alpha=-1"], "partition.alpha=-1", "> 0"),
    (["partition=inner_dirichlet", "partition.size_sigma=-1"], "partition.size_sigma=-1", ">= 0"),
    (["partition=inner_dirichlet", "num_clients=50", "partition.min_partition_size=40"],
     "partition.min_partition_size=40", "50 clients x 40 = 2000 examples"),
    (["partition.kind=shards"], "partition.kind='shards'", "partition=inner_dirichlet"),
    (["ranks.tiers=[0,4]"], "ranks=[0]", ">= 1"),
    (["ranks.tiers=[4,1000]"], "ranks=[1000]", "width 384"),
    (["ranks.policy=explicit", "ranks.explicit=[4,8]"], "ranks.explicit=[4, 8]", "one rank per client"),
    (["model.name=no-such-model-xyz"], "model.name='no-such-model-xyz'", "HF_HUB_OFFLINE=1"),
    (["model.target_modules=[nope]"], "model.target_modules=['nope']", "query, value"),
    (["data.name=no_such_dataset"], "data.name='no_such_dataset'", "local file"),
    (["data.name=/nonexistent/file.csv"], "data.name='/nonexistent/file.csv'", "does not exist"),
    (["strategy._target_=strategies.nope.Nope"], "strategy._target_='strategies.nope.Nope'", "conf/strategy"),
    (["train.lr=0"], "train.lr=0", "> 0"),
    (["num_rounds=0"], "num_rounds=0", "positive integer"),
    (["logging.wandb.enabled=true"], "logging.wandb.enabled=True", "pip install wandb"),
    (["simulation.client_resources.num_gpus=-1"], "simulation.client_resources.num_gpus=-1", "GPU share"),
    # reliability: client minimums, timeout, norm bound, checkpointing, faults, resume
    (["min_clients=0"], "min_clients=0", "integer >= 1"),
    (["min_fit_clients=0"], "min_fit_clients=0", "integer >= 1"),
    (["min_fit_clients=11"], "min_fit_clients=11", "cannot exceed num_clients=10"),
    (["min_clients=12"], "min_clients=12", "cannot exceed num_clients=10"),
    (["round_timeout=0"], "round_timeout=0", "number > 0"),
    (["round_timeout=-5"], "round_timeout=-5", "number > 0"),
    (["max_norm_ratio=1"], "max_norm_ratio=1", "number > 1"),
    (["max_norm_ratio=abc"], "max_norm_ratio='abc'", "or null to turn it off"),
    (["checkpoint=maybe"], "checkpoint='maybe'", "true or false"),
    (["faults.fail_prob=1.5"], "faults.fail_prob=1.5", "[0, 1]"),
    (["faults.straggler_prob=-0.1"], "faults.straggler_prob=-0.1", "[0, 1]"),
    (["faults.corrupt_prob=2"], "faults.corrupt_prob=2", "[0, 1]"),
    (["faults.straggler_delay_s=-1"], "faults.straggler_delay_s=-1", "number >= 0"),
    (["faults.corrupt_kind=garbage"], "faults.corrupt_kind='garbage'", "missing_key"),
    (["faults.corrupt={1: garbage}"], "faults.corrupt.1='garbage'", "use one of nan, inf"),
    (["faults.corrupt={12: nan}"], "faults.corrupt.12=nan", "client id in 0..9"),
    (["faults.seed=abc"], "faults.seed='abc'", "an integer, or null"),
    (["+faults.crash=true"], "faults=['crash']", "unknown fault option"),
    (["resume=/nonexistent/run"], "resume='/nonexistent/run'", "no such directory"),
    (["strategy=flora", "compression=compeft", "compression.error_feedback=true"],
     "compression.error_feedback=True", "fresh LoRA factors every round"),
    (["downlink=compeft", "downlink.scale=std"], "downlink.scale='std'", "downlink.scale=mean_abs"),
    (["downlink=compeft", "downlink.density=5"], "downlink.density=5", "not a fraction in (0, 1]"),
    (["downlink=compeft", "downlink.error_feedback=true"], "downlink.error_feedback=True", "count it twice"),
    (["downlink=compeft", "strategy=flora"], "downlink='compeft'", "use downlink=svd (the merges truncated"),
    (["downlink=compeft", "privacy=secagg"], "downlink='compeft'", "use downlink=none with privacy.secure=true"),
    (["downlink=compeft", "strategy=centralized"], "downlink='compeft'", "the centralized bound communicates"),
    (["data.client_test_fraction=1.5"], "data.client_test_fraction=1.5", "a number in [0, 1)"),
    (["eval.client_every=-1"], "eval.client_every=-1", "an integer >= 0"),
    (["data.client_test_fraction=0.2", "strategy=centralized"], "data.client_test_fraction=0.2",
     "use data.client_test_fraction=0 with strategy=centralized"),
    # tasks: causal-LM data, models, prompts, generation, decoder options
    (["task=causal_lm", "data=bbc_news"], "data.name='bbc_news'", "data=synthetic_instructions"),
    (["task=causal_lm", "model=minilm"], "model.name='all-MiniLM-L6-v2'", "model=tiny_decoder"),
    (["model=tiny_decoder"], "model.name='tiny-random-llama'", "task=causal_lm"),
    (["data=synthetic_instructions"], "data.name='synthetic_instructions'", "task=causal_lm"),
    (["task.kind=regression"], "task.kind='regression'", "task=causal_lm"),
    (["task=causal_lm", "data.format=xml"], "data.format='xml'", "auto, alpaca, dolly"),
    (["task=causal_lm", "data.name=/nonexistent/dolly.jsonl"], "data.name='/nonexistent/dolly.jsonl'",
     "does not exist"),
    (["task=causal_lm", "data.name=notes.csv"], "data.name='notes.csv'", ".jsonl file"),
    (["task=causal_lm", "data.name=some/hub_dataset"], "data.name='some/hub_dataset'", "offline=false"),
    (["task=causal_lm", "task.prompt_with_input='Q: {instruction} A:'"], "task.prompt_with_input=",
     "must contain {input}"),
    (["task=causal_lm", "task.prompt_without_input='{instruction} {context}'"], "task.prompt_without_input=",
     "unknown field(s) ['context']"),
    (["task=causal_lm", "task.max_new_tokens=0"], "task.max_new_tokens=0", "integer >= 1"),
    (["task=causal_lm", "task.num_generations=-1"], "task.num_generations=-1", "integer >= 0"),
    (["task=causal_lm", "model.dtype=float8"], "model.dtype='float8'", "bfloat16"),
    (["task=causal_lm", "model.gradient_checkpointing=sometimes"], "model.gradient_checkpointing='sometimes'",
     "auto (on for a GPU), true or false"),
    (["task=causal_lm", "ranks.tiers=[2,100]"], "ranks=[100]", "width 64"),
    (["task=causal_lm", "model.target_modules=[query]"], "model.target_modules=['query']", "q_proj"),
]


@pytest.mark.parametrize("overrides,field,fix", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_value_is_named_with_its_fix(overrides: list[str], field: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    message = str(info.value)
    assert field in message and fix in message, message


def test_local_file_with_wrong_columns(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("body,y\nhello,0\n")
    with pytest.raises(ConfigError) as info:
        validate(compose(["data=local_file", f"data.name={path}"]))
    assert "data.text_column='text'" in str(info.value) and "['body', 'y']" in str(info.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(["num_clients=0", "fraction_train=2", "partition.alpha=0", "model.name=nope-xyz"]))
    assert len(info.value.problems) == 4


def test_resume_needs_a_run_directory_with_a_checkpoint(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a fedlora run directory"):
        validate(compose([f"resume={tmp_path}"]))
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        validate(compose([f"resume={tmp_path}"]))


def test_reliability_problems_are_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(["faults=flaky", "faults.fail_prob=3", "min_fit_clients=0", "round_timeout=0",
                          "max_norm_ratio=0.5", "faults.corrupt_kind=zzz"]))
    assert len(info.value.problems) == 5


def test_rank_policies() -> None:
    assert RankSettings("cycle", (2, 8)).assign(5, 0) == [2, 8, 2, 8, 2]
    assert RankSettings("explicit", explicit=(16, 4)).assign(2, 0) == [16, 4]
    rnd = RankSettings("random", (2, 4)).assign(50, 1)
    assert set(rnd) == {2, 4} and rnd == RankSettings("random", (2, 4)).assign(50, 1)


def test_cli_rejects_bad_config_before_ray_starts(tmp_path) -> None:
    out = run_fedlora(["num_clients=0", "partition.alpha=-1"], tmp_path / "run", timeout=120)
    assert out.returncode == 2
    assert "num_clients=0" in out.stderr and "partition.alpha=-1" in out.stderr
    assert "connected, ranks" not in out.stdout and "Ray" not in out.stdout + out.stderr
    assert (tmp_path / "run" / "FAILED").exists()


@pytest.mark.parametrize("strategy,setting,scope", [
    ("fedavg", "auto", "all"), ("ffa_lora", "auto", "all"), ("lora_fair", "auto", "all"),
    ("flora", "auto", "all but the fresh LoRA factors"),
    ("fedavg", "false", "none"), ("flora", "false", "none"), ("fedavg", "true", "all"),
])
def test_error_feedback_auto_skips_only_fresh_factors(strategy: str, setting: str, scope: str) -> None:
    from fedlora.federation.loop import feedback_scope

    cfg = compose([f"strategy={strategy}", "compression=compeft", f"compression.error_feedback={setting}"])
    validate(cfg, check_model=False, check_data=False)
    settings = Settings.from_config(cfg)
    compressor = settings.compression.build()
    assert feedback_scope(compressor, settings.strategy.build()) == scope
    assert compressor.error_feedback is (scope != "none")
    assert cfg["compression"]["error_feedback"] == {"auto": "auto", "true": True, "false": False}[setting]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_instruction_files_are_checked_before_anything_starts(tmp_path: Path) -> None:
    alpaca = _write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "a", "input": "", "output": "b"}] * 20)
    dolly = _write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "a", "context": "", "response": "b",
                                                     "category": "qa"}] * 20)
    other = _write_jsonl(tmp_path / "other.jsonl", [{"text": "a", "label": 1}] * 20)
    base = ["task=causal_lm", "data=instructions_file", "num_clients=2", "partition.min_partition_size=2"]
    validate(compose([*base, f"data.name={dolly}"]))  # Dolly has a category: Dirichlet is fine
    validate(compose([*base, f"data.name={alpaca}", "partition=iid"]))
    with pytest.raises(ConfigError) as info:  # Alpaca has no category to skew clients by
        validate(compose([*base, f"data.name={alpaca}"]))
    assert "partition.kind='dirichlet'" in str(info.value) and "use partition=iid" in str(info.value)
    validate(compose([*base, f"data.name={alpaca}", "num_clients=1"]))  # one client: nothing to skew
    with pytest.raises(ConfigError) as info:
        validate(compose([*base, f"data.name={other}", "partition=iid"]))
    assert f"data.name='{other}'" in str(info.value) and "instruction/context/response" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate(compose([*base, f"data.name={alpaca}", "partition=iid", "data.format=dolly"]))
    assert "data.format='dolly'" in str(info.value) and "instruction+response (dolly)" in str(info.value)


def test_4bit_base_needs_bitsandbytes_and_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import torch

    with pytest.raises(ConfigError) as info:
        validate(compose(["task=causal_lm", "model.load_in_4bit=true"]))
    message = str(info.value)
    assert "model.load_in_4bit=True" in message
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "pip install bitsandbytes" in message
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in message
    real_find_spec = importlib.util.find_spec  # both present: no problem left from these two checks
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    validate(compose(["task=causal_lm", "model.load_in_4bit=true"]))
    with pytest.raises(ConfigError, match="a 4-bit base is for task=causal_lm"):
        validate(compose(["+model.load_in_4bit=true"]))


def test_task_causal_lm_switches_model_and_data_unless_given() -> None:
    cfg = compose(["task=causal_lm"])
    assert cfg["task"]["kind"] == "causal_lm" and cfg["model"]["name"] == "tiny-random-llama"
    assert cfg["data"]["name"] == "synthetic_instructions"
    assert compose(["task=causal_lm", "model=tinyllama"])["model"]["name"].startswith("TinyLlama/")
    assert compose([])["task"] == {"kind": "classification"}


def test_cli_rejects_a_causal_config_before_ray_starts(tmp_path) -> None:
    out = run_fedlora(["task=causal_lm", "data=bbc_news", "task.max_new_tokens=0"], tmp_path / "run",
                      timeout=120)
    assert out.returncode == 2
    assert "data.name='bbc_news'" in out.stderr and "task.max_new_tokens=0" in out.stderr
    assert "connected, ranks" not in out.stdout and "Ray" not in out.stdout + out.stderr


def test_hyperparameter_errors_come_with_the_others_before_flower_or_ray_is_imported(tmp_path: Path) -> None:
    # Stand-ins for ray and flwr that raise when imported: the command must find and report every
    # problem, the strategy's and the compressor's hyperparameters included, without loading either.
    import os

    fake = tmp_path / "site"
    for name in ("ray", "flwr"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} imported before the config check')\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    out = run_fedlora(["strategy=lora_fair", "strategy.lam=-1", "compression=compeft", "compression.density=5",
                       "num_clients=0"], tmp_path / "run", timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "fedlora: 3 problem(s) in the configuration:" in out.stderr
    assert "num_clients=0: must be a positive integer" in out.stderr
    assert "strategy.lam=-1 is invalid: the ridge strength must be a finite number > 0" in out.stderr
    assert "compression.density=5 is not a fraction in (0, 1]" in out.stderr
    assert "imported before the config check" not in out.stderr


def test_the_centralized_bound_refuses_compression_and_faults() -> None:
    validate(compose(["strategy=centralized"]), check_model=False, check_data=False)
    with pytest.raises(ConfigError) as info:
        validate(compose(["strategy=centralized", "compression=compeft", "faults=flaky"]), check_model=False,
                 check_data=False)
    text = str(info.value)
    assert "2 problem(s)" in text and "use compression=none with strategy=centralized" in text
    assert "the centralized bound has no clients to fail; use faults=none" in text
    with pytest.raises(ConfigError, match=r"transport='carrier-pigeon': use one of flower, pooled"):
        validate(compose(["+transport=carrier-pigeon"]), check_model=False, check_data=False)


def test_settings_are_built_once_from_a_valid_config() -> None:
    cfg = compose(["strategy=flora", "compression=compeft", "num_clients=4", "ranks.tiers=[2,8]"])
    settings = Settings.from_config(cfg)
    assert settings.loop.num_clients == 4 and settings.loop.round_timeout == cfg["round_timeout"]
    assert settings.client_ranks() == [2, 8, 2, 8] and settings.transport == "flower"
    assert settings.strategy.target == "strategies.flora.FLoRA"
    assert settings.strategy.options == {"weighting": "examples"}
    assert settings.compression is not None and settings.compression.build().density == 0.1
    assert settings.model.decoder is False and Settings.from_config(compose(["task=causal_lm"])).model.decoder
    assert hash(settings) == hash(Settings.from_config(cfg))  # hashable: per-process caches key on it
    assert Settings.from_config(compose(["strategy=centralized"])).transport == "pooled"


def test_per_client_evaluation_is_on_only_with_held_out_examples() -> None:
    assert Settings.from_config(compose([])).loop.client_eval_every is None
    on = Settings.from_config(compose(["data.client_test_fraction=0.2", "eval.client_every=3"]))
    assert on.loop.client_eval_every == 3 and on.data.client_test_fraction == 0.2
    assert Settings.from_config(compose(["eval.client_every=3"])).loop.client_eval_every is None
