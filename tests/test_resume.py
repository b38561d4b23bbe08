"""A job killed mid-stage (driver and its local Ray, SIGKILL) and resumed with ``--resume``: only the
unfinished stage runs again; a changed finished stage is refused before any actor starts."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_job_killed_mid_stage_resumes_from_that_stage(tmp_path):
    """SIGKILL the whole job (driver and its local Ray) during its GRPO stage; ``--resume`` skips the
    finished SFT stage (its checkpoint untouched) and runs the GRPO stage again from its start."""
    args = [sys.executable, "-m", "cluster.cli", "train", "cluster/configs/demo.yaml", f"run.root={tmp_path}",
            "run.name=k", "stages.0.steps=20", "stages.1.steps=3", "algo.prompts_per_step=4",
            "rollout.group_size=2", "eval.num_prompts=4", "eval.k=1", "run.dashboard=false"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    run_dir = tmp_path / "k"
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists() and any(json.loads(x).get("stage") == "1-grpo"
                                        for x in metrics.read_text().splitlines() if x.strip()):
                break
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("the GRPO stage did not start within 300 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    state = json.load(open(run_dir / "pipeline.json"))
    assert state["stages"]["0-sft"]["status"] == "done" and state["stages"]["1-grpo"]["status"] == "running"
    sft_ckpt = run_dir / "checkpoints" / "0-sft" / "model.safetensors"
    mtime = sft_ckpt.stat().st_mtime
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage 0-sft (sft): finished in an earlier run, skipped" in done.stderr
    assert sft_ckpt.stat().st_mtime == mtime
    got = [(r["stage"], r["step"]) for r in rows(run_dir / "metrics.jsonl")]
    assert got == [("0-sft", s) for s in range(1, 21)] + [("1-grpo", s) for s in range(1, 4)]
    assert json.load(open(run_dir / "pipeline.json"))["stages"]["1-grpo"]["status"] == "done"
    # a changed finished stage is refused before any actor starts
    bad = subprocess.run(args[:-1] + ["stages.0.steps=21", "--resume"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "cannot resume: stage 0-sft finished with another config" in bad.stderr
