"""Config: built, overridden and validated before any actor starts; errors name the field."""
import os

import pytest
import yaml

from cluster.cli import DEMO_CONFIG, main
from cluster.config import apply_override, load_config


def test_demo_config_loads_and_resolves():
    cfg = load_config(DEMO_CONFIG)
    assert cfg.stages[0].type == "sft" and cfg.stages[1].type == "grpo"
    assert cfg.stages[1].name == "1-grpo"
    assert cfg.learner.loss.norm_len == cfg.rollout.max_tokens  # filled from the rollout budget


def test_dotted_overrides_reach_nested_and_list_fields():
    cfg = load_config(DEMO_CONFIG, ["learner.loss.kl_coef=0.5", "stages.1.steps=3", "rollout.stop=[x]"])
    assert cfg.learner.loss.kl_coef == 0.5
    assert cfg.stages[1].steps == 3
    assert cfg.rollout.stop == ["x"]


@pytest.mark.parametrize("override, message", [
    ("learner.lrr=1", "learner.lrr"),
    ("rollout.top_p=0.95", "renormalised over the nucleus"),
    ("rollout.max_tokens=1024", "leaves no room for the prompt"),
    ("eval.top_p=0", "eval.top_p"),
    ("run.if_exists=keep", "run.if_exists must be"),
    ("algo.truncated=drop", "algo.truncated must be mask or keep"),
    ("algo.failed_checks=skip", "algo.failed_checks"),
    ("algo.zero_variance_groups=refill", "algo.zero_variance_groups"),
    ("algo.overlong_buffer=24", "algo.overlong_buffer"),
    ("learner.loss.clip_ratio_c=0.5", "clip_ratio_c must be > 1"),
    ("rollout.generate_timeout_s=0", "generate_timeout_s"),
    ("rollout.kv_cache_gb=0", "rollout.kv_cache_gb must be > 0"),
    ("rollout.group_size=1", "rollout.group_size must be >= 2"),
    ("learner.loss.aggregation=mean", "learner.loss.aggregation must be one of"),
    ("algo.max_staleness=-1", "algo.max_staleness"),
    ("stages.0.type=ppo", "stages.0.type must be one of sft, grpo"),
    ("rollout.template=chatml", "known:.*plain, qa, r1_zero"),
    ("learner.backend=megatron", "gpus_per_actor > 0"),
    ("learner.reference=rollout", "learner.reference must be learner or pool"),
    ("learner.reference_actors=0", "reference_actors must be >= 1"),
    ("rollout.temperature=0", "rollout.temperature must be > 0"),
    ("learner.lr=fast", "learner.lr must be float"),
    ("model.path=/nonexistent", "model.path"),
    ("data.train=/nope.jsonl", "data.train"),
    ("rollout.weight_transport=nccl", "one of torch_dist, by_value, vllm_ipc, vllm_nccl"),
    ("rollout.weight_transport=vllm_ipc", "rollout.gpus_per_actor > 0"),
])
def test_bad_config_fails_with_the_field_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEMO_CONFIG, [override])


def test_unknown_section_lists_known_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"learnr": {"lr": 1}}))
    with pytest.raises(ValueError, match="known keys: algo, data, eval, learner"):
        load_config(str(p))


def test_cli_reports_bad_config_without_starting_anything(capsys):
    assert main(["train", DEMO_CONFIG, "rollout.group_size=1"]) == 2
    assert "rollout.group_size" in capsys.readouterr().err


def test_float_fields_accept_yaml_exponent_strings():
    assert load_config(DEMO_CONFIG, ["learner.lr=5e-5"]).learner.lr == 5e-5


def test_apply_override_rejects_missing_equals():
    with pytest.raises(ValueError, match="key.path=value"):
        apply_override({}, "learner.lr")


def test_vllm_transports_need_gpu_learners_and_ipc_one_learner_process():
    gpu = ["rollout.gpus_per_actor=0.5"]
    with pytest.raises(ValueError, match="learner.gpus_per_actor > 0"):
        load_config(DEMO_CONFIG, gpu + ["rollout.weight_transport=vllm_nccl"])
    with pytest.raises(ValueError, match="learner.num_actors=1"):
        load_config(DEMO_CONFIG, gpu + ["rollout.weight_transport=vllm_ipc", "learner.gpus_per_actor=0.5",
                                        "learner.num_actors=2"])
    cfg = load_config(DEMO_CONFIG, gpu + ["rollout.weight_transport=vllm_ipc", "learner.gpus_per_actor=0.5"])
    assert cfg.rollout.weight_transport == "vllm_ipc"


def test_megatron_takes_any_temperature_and_mini_batches():
    cfg = load_config(DEMO_CONFIG, ["learner.backend=megatron", "learner.gpus_per_actor=1",
                                    "learner.reference=learner",
                                    "rollout.temperature=0.7", "learner.mini_batches=4"])
    assert cfg.rollout.temperature == 0.7 and cfg.learner.mini_batches == 4


def test_megatron_with_the_reference_pool_is_refused_with_the_fix_named():
    with pytest.raises(ValueError, match="use reference=learner"):
        load_config(DEMO_CONFIG, ["learner.backend=megatron", "learner.gpus_per_actor=1"])


@pytest.mark.parametrize("name", ["grpo_gpu.yaml", "megatron_moe.yaml", "megatron_moe_1gpu.yaml"])
def test_example_configs_load(name, tmp_path):
    import os
    path = os.path.join(os.path.dirname(DEMO_CONFIG), "..", "..", "examples", name)
    cfg = load_config(path, [f"model.path={tmp_path}", "data.train=arithmetic", "data.test=arithmetic"])
    assert cfg.learner.gpus_per_actor > 0


def test_top_p_below_one_is_allowed_when_no_stage_trains_with_it():
    cfg = load_config(DEMO_CONFIG, ["eval.top_p=0.9", "stages=[{type: sft, steps: 1}]", "rollout.top_p=0.9"])
    assert cfg.eval.top_p == 0.9


def test_a_taken_run_directory_is_refused_replaced_or_renamed(tmp_path):
    from cluster.controller import prepare_run_dir

    first = prepare_run_dir(str(tmp_path), "r", "error")
    open(f"{first}/metrics.jsonl", "w").write("{}\n")
    with pytest.raises(ValueError, match="already holds a run"):
        prepare_run_dir(str(tmp_path), "r", "error")
    assert prepare_run_dir(str(tmp_path), "r", "new") == f"{first}-2"
    assert prepare_run_dir(str(tmp_path), "r", "overwrite") == first
    import os
    assert not os.path.exists(f"{first}/metrics.jsonl")


def test_sft_stages_load_no_reference_model(tmp_path):
    from cluster.controller import Controller

    cfg = load_config(DEMO_CONFIG, [f"run.root={tmp_path}", "learner.loss.kl_coef=0.01"])
    ctl = Controller(cfg)
    assert ctl.learner_cfg(cfg.stages[0]).loss.kl_coef == 0.0  # sft
    assert ctl.learner_cfg(cfg.stages[1]).loss.kl_coef == 0.01  # grpo keeps its KL


def test_driver_reaches_ray_start_without_importing_torch(tmp_path):
    """What `aha train` runs before ``ray.init`` (config, controller, preflight, run directory)
    imports neither torch nor transformers: the tokenizer's prefetch thread imports them beside
    Ray's start (~1 s of the start on 2 cores). Run in a fresh interpreter: this one has torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cluster.cli import DEMO_CONFIG\n"
        "from cluster.config import load_config\n"
        "from cluster.controller import Controller, start_ray\n"
        f"cfg = load_config(DEMO_CONFIG, ['run.root={tmp_path}', 'run.name=imports'])\n"
        "Controller(cfg)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_prefetch_writes_the_tiny_model_once_beside_the_driver(tmp_path):
    """``Controller.prefetch`` writes the built-in tiny model in its thread; the stage's own
    ``model_path`` call waits for it and gets the same checkpoint (not a second one)."""
    from cluster.controller import Controller, tokenizer

    cfg = load_config(DEMO_CONFIG, [f"run.root={tmp_path}", "run.name=prefetch"])
    ctl = Controller(cfg)
    made, base_model = [], ctl.base_model
    ctl.base_model = lambda *a: made.append(a) or base_model(*a)
    ctl.prefetch()
    path = ctl.model_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert ctl.model_path() == path and ctl.input_model(0, cfg.stages[0]) == path
    assert len(made) == 1
    assert tokenizer(path)("1 + 1")["input_ids"]
