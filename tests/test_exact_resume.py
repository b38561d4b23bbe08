"""Exact resume inside a GRPO stage: with ``algo.max_staleness: 0`` and ``rollout.request_seeds``,
a run of 6 steps and a run killed after its step-3 checkpoint (``run.checkpoint_every: 3``) then
resumed give the same per-step rewards and bit-identical final weights."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.test_faults import grpo_rows

ARGS = ["cluster/configs/demo.yaml", "stages.0.steps=20", "stages.1.steps=6", "algo.prompts_per_step=4",
        "rollout.group_size=4", "eval.num_prompts=4", "eval.k=1", "run.dashboard=false", "run.tensorboard=false",
        "algo.max_staleness=0", "rollout.request_seeds=true", "run.checkpoint_every=3"]


def train(cluster, tmp_path, name, extra=(), wait=True):
    args = [sys.executable, "-m", "cluster.cli", "train", *ARGS, f"run.root={tmp_path}", f"run.name={name}",
            *extra]
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address}  # the shared test cluster: no Ray start per run
    if wait:
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-4000:]
        return out
    return subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_six_steps_equal_three_plus_resume_plus_three(ray_cluster, tmp_path):
    train(ray_cluster, tmp_path, "straight")
    proc = train(ray_cluster, tmp_path, "cut", wait=False)
    state = tmp_path / "cut" / "checkpoints" / "1-grpo-state" / "manifest.json"
    try:
        deadline = time.time() + 600
        while not state.exists():
            assert proc.poll() is None, "the job ended before its in-stage checkpoint"
            assert time.time() < deadline, "no in-stage checkpoint within 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = json.load(open(state.parent / "state.json"))
    assert saved["step"] == 3 and saved["version"] == 3
    out = train(ray_cluster, tmp_path, "cut", ["--resume"])
    assert "stage 1-grpo resumes after step 3" in out.stderr
    a, b = grpo_rows(tmp_path / "straight"), grpo_rows(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7))  # rows 4.. of the killed run were dropped
    for key in ("reward_mean", "accuracy_mean", "response_len_mean", "kl", "loss", "weight_version"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    wa = load_file(tmp_path / "straight" / "checkpoints" / "1-grpo" / "model.safetensors")
    wb = load_file(tmp_path / "cut" / "checkpoints" / "1-grpo" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k  # bit-exact
    assert not (tmp_path / "cut" / "checkpoints" / "1-grpo-state").exists()  # dropped at stage end
    summary = [json.load(open(tmp_path / n / "summary.json"))["samples"]["1-grpo"] for n in ("straight", "cut")]
    assert summary[0]["trained"] == summary[1]["trained"] == 6 * 4 * 4
