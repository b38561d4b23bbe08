"""Live scaling of a running job's rollout pool from outside (``python -m cluster.control scale``,
what ``aha scale`` sends): 1 -> 2 -> 1 engines during a GRPO stage on a ``ray start`` cluster. The
new engine serves only once it holds the current weights; the removed one finishes its request
first; versions, sample counts and staleness stay correct."""
import json
import os
import subprocess
import sys


from tests.cluster_fixture import wait_for
from tests.test_faults import assert_one_version_per_update, grpo_rows, start_job


def control(cluster, *args):
    out = subprocess.run([sys.executable, "-m", "cluster.control", *args], capture_output=True, text=True,
                         timeout=180, env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address})
    return out.returncode, out.stdout + out.stderr


def test_scale_rollout_1_2_1_while_training(ray_cluster, tmp_path):
    steps = 120  # outlasts both scale requests: the second engine alone takes ~15 s to start
    cluster = ray_cluster
    proc, run_dir, log = start_job(cluster, tmp_path, "scale", [
        f"stages.1.steps={steps}", "rollout.num_actors=1", "algo.max_staleness=1"],
        {"AHA_DEBUG_SLOW": "generate:0:0.3"})  # steps slow enough for the scaling to land mid-stage
    try:
        wait_for(lambda: len(grpo_rows(run_dir)) >= 2, 300, proc, "the GRPO stage did not start")
        rc, out = control(cluster, "scale", "scale", "rollout=2")
        assert rc == 0, out
        wait_for(lambda: any(r["pool_rollout"] == 2 for r in grpo_rows(run_dir)), 180, proc,
                 "the second engine did not join")
        joined = next(r["step"] for r in grpo_rows(run_dir) if r["pool_rollout"] == 2)
        wait_for(lambda: any("engine_tokens_per_s/1" in r for r in grpo_rows(run_dir)), 60, proc,
                 "the new engine served no request")
        rc, out = control(cluster, "scale", "scale", "rollout=1")
        assert rc == 0, out
        wait_for(lambda: any(r["step"] > joined and r["pool_rollout"] == 1 and r["pool_rollout_retiring"] == 0
                             for r in grpo_rows(run_dir)), 120, proc, "the engine was not removed")
        rc, out = control(cluster, "status", "scale")
        assert rc == 0 and '"stage": "1-grpo"' in out, out
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    got = grpo_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert_one_version_per_update(got)
    sizes = [r["pool_rollout"] for r in got]
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1
    assert max(r["staleness_max"] for r in got) <= 1
    last = got[-1]
    assert last["rollout_engines_started"] == 2 and last["rollout_engines_retired"] == 1
    summary = json.load(open(run_dir / "summary.json"))["samples"]["1-grpo"]
    assert summary["trained"] == steps * 4 * 2
    dropped = sum(v for k, v in summary.items() if k.startswith("dropped_"))
    assert summary["generated"] == summary["trained"] + dropped, summary  # nothing lost uncounted


def test_stop_writes_a_checkpoint_and_resume_continues_from_it(ray_cluster, tmp_path):
    cluster = ray_cluster
    proc, run_dir, log = start_job(cluster, tmp_path, "stopme", ["stages.1.steps=300", "rollout.num_actors=1"])
    try:
        wait_for(lambda: len(grpo_rows(run_dir)) >= 3, 300, proc, "the GRPO stage did not start")
        rc, out = control(cluster, "stop", "stopme")
        assert rc == 0 and '"checkpoint"' in out, out
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "aha resume" in log.read_text()
    state = json.load(open(run_dir / "checkpoints" / "1-grpo-state" / "state.json"))
    assert json.load(open(run_dir / "pipeline.json"))["stages"]["1-grpo"]["status"] == "stopped"
    stopped_at = state["step"]
    assert [r["step"] for r in grpo_rows(run_dir)] == list(range(1, stopped_at + 1))
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "resume", str(run_dir)],
                         capture_output=True, text=True, timeout=900,
                         env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address})
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"stage 1-grpo resumes after step {stopped_at}" in out.stderr
    got = grpo_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 301))
    assert_one_version_per_update(got)
