"""Faults injected from outside a running job, on a Ray cluster started with ``ray start``: a rollout
engine killed (``kill -9``) mid-generation and another mid-sync, a reward actor and one of its
worker processes killed; the job goes on, every lost sample is counted, the replacements get the
current weights. A killed learner stops the job with an error that says how to resume.

``AHA_DEBUG_SLOW`` (rollout/engine.py) holds engine 0 in each generation and engine 1 in each weight
receive for a moment, so the kills land where they are meant to.
"""
import json
import os
import signal
import subprocess
import sys
import time


from tests.cluster_fixture import wait_for


def rows(path):
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def grpo_rows(run_dir):
    return [r for r in rows(run_dir / "metrics.jsonl") if r.get("stage") == "1-grpo"]


def assert_one_version_per_update(got):
    """The weight version advances by one at every step that trained; a step whose every sample
    was masked (all truncated, say: the tiny model does that now and then over a long run) skips
    its update and says so in ``steps_skipped``, cumulative across a resume."""
    version = skipped = 0
    for r in got:
        if r["loss_samples"] == 0:
            skipped += 1
        else:
            version += 1
        assert (r["weight_version"], r["steps_skipped"]) == (version, skipped), (r["step"], r)


JOB = ["cluster/configs/demo.yaml", "stages.0.steps=20", "algo.prompts_per_step=4", "rollout.group_size=2",
       "eval.num_prompts=4", "eval.k=1", "run.dashboard=false", "run.tensorboard=false",
       "rollout.sync_timeout_s=20", "rollout.generate_timeout_s=60"]


def start_job(cluster, tmp_path, name, overrides, env_extra=None):
    args = [sys.executable, "-m", "cluster.cli", "train", *JOB, f"run.root={tmp_path}", f"run.name={name}",
            *overrides]
    env = {**cluster.env, "RAY_ADDRESS": cluster.gcs_address, **(env_extra or {})}
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = tmp_path / f"{name}.log"  # wait_for shows its tail when the job ends early
    return proc, tmp_path / name, proc.log_path


def test_dead_engines_and_reward_actors_are_replaced_and_counted(ray_cluster, tmp_path):
    cluster = ray_cluster
    proc, run_dir, log = start_job(cluster, tmp_path, "faults", [
        "stages.1.steps=40", "rollout.num_actors=2", "algo.max_staleness=1"],
        {"AHA_DEBUG_SLOW": "generate:0:3,sync:1:3"})
    try:
        wait_for(lambda: len(grpo_rows(run_dir)) >= 1, 300, proc, "the GRPO stage did not start")
        # (a) engine 0 sleeps 3 s inside each generate: kill it there
        engine0 = cluster.actors("RolloutActor", name_suffix="-0")
        assert len(engine0) == 1
        os.kill(engine0[0]["pid"], signal.SIGKILL)
        wait_for(lambda: any(r.get("rollout_engines_replaced", 0) >= 1 and r["pool_rollout"] == 2
                             for r in grpo_rows(run_dir)), 240, proc, "engine 0 was not replaced")
        # (a) engine 1 sleeps 3 s before each weight receive, holding the sync: kill it there
        n_before = len(grpo_rows(run_dir))
        engine1 = cluster.actors("RolloutActor", name_suffix="-1")
        wait_for(lambda: len(grpo_rows(run_dir)) > n_before, 120, proc, "no step after the replacement")
        time.sleep(1.0)  # inside the next sync (train is fast; the sync waits 3 s on engine 1)
        os.kill(engine1[0]["pid"], signal.SIGKILL)
        wait_for(lambda: any(r.get("rollout_engines_replaced", 0) >= 2 for r in grpo_rows(run_dir)), 240,
                 proc, "engine 1 was not replaced")
        # (b) a reward actor, then one of its verifier worker processes
        reward = cluster.actors("RewardActor")
        os.kill(reward[0]["pid"], signal.SIGKILL)
        def replaced():  # one read of the actor list: between two reads the new one may not be up
            now = cluster.actors("RewardActor")
            return len(now) == len(reward) and now[0]["pid"] != reward[0]["pid"] and now
        new_reward = wait_for(replaced, 120, proc, "the reward actor was not replaced")[0]["pid"]
        import psutil
        workers = psutil.Process(new_reward).children(recursive=True)
        if workers:
            workers[0].kill()
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "died during weight sync" in text, text[-3000:]
    assert "engine(s) [2] serving" in text  # the first replacement got the weights and served
    got = grpo_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 41))
    last = got[-1]
    assert last["rollout_engines_replaced"] == 2 and last["rollout_engines_died"] == 2
    assert last["samples_dropped_actor_died"] >= 2  # engine 0's request in flight (a group of 2 at least)
    assert last["reward_retries"] >= 0
    # every generated sample is trained on or counted as dropped, none twice
    summary = json.load(open(run_dir / "summary.json"))["samples"]["1-grpo"]
    dropped = sum(v for k, v in summary.items() if k.startswith("dropped_"))
    assert summary["generated"] == summary["trained"] + dropped - summary.get("dropped_actor_died", 0) \
        - summary.get("dropped_generate_timeout", 0), summary
    assert summary["trained"] == 40 * 4 * 2
    # staleness stays within the bound; versions advance one per step
    assert max(r["staleness_max"] for r in got) <= 1
    assert_one_version_per_update(got)


def test_a_killed_learner_stops_the_job_and_says_how_to_resume(ray_cluster, tmp_path):
    cluster = ray_cluster
    proc, run_dir, log = start_job(cluster, tmp_path, "learner", ["stages.1.steps=200"])
    try:
        wait_for(lambda: len(grpo_rows(run_dir)) >= 2, 300, proc, "the GRPO stage did not start")
        learner = cluster.actors("LearnerActor")
        os.kill(learner[0]["pid"], signal.SIGKILL)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert "aha resume" in text and "learner" in text.lower(), text[-3000:]
    state = json.load(open(run_dir / "pipeline.json"))
    assert state["stages"]["1-grpo"]["status"] == "failed"


def test_a_lost_node_is_survived_like_a_dead_engine(ray_cluster, tmp_path):
    """Two more nodes join, each with one ``engine_slot``; the job's only engine needs one. The node
    that hosts it is then lost (every process of it SIGKILLed, as when a machine goes away): the
    engine is replaced on the other node, which gets the current weights, and the job finishes."""
    cluster = ray_cluster
    for name in ("n3", "n4"):
        cluster.add_node(name, cpus=1, resources={"engine_slot": 1})
    steps = 30
    proc, run_dir, log = start_job(cluster, tmp_path, "nodeloss", [
        f"stages.1.steps={steps}", "rollout.num_actors=1", "algo.max_staleness=1",
        "run.rollout_resources={engine_slot: 1}"], {"AHA_DEBUG_SLOW": "generate:0:2"})
    lost = None
    try:
        wait_for(lambda: len(grpo_rows(run_dir)) >= 2, 300, proc, "the GRPO stage did not start")
        engine = cluster.actors("RolloutActor", name_suffix="-0")
        assert len(engine) == 1
        lost = cluster.node_of(engine[0]["pid"])
        assert lost in ("n3", "n4"), lost  # placed by its resource
        assert cluster.kill_node(lost) >= 2  # raylet, agents, the engine's worker, its vLLM process
        wait_for(lambda: any(r.get("rollout_engines_replaced", 0) >= 1 for r in grpo_rows(run_dir)), 240,
                 proc, "the engine of the lost node was not replaced")
        wait_for(lambda: cluster.actors("RolloutActor", name_suffix="-1"), 60, proc, "no replacement actor")
        other = cluster.node_of(cluster.actors("RolloutActor", name_suffix="-1")[0]["pid"])
        assert other in ("n3", "n4") and other != lost, (lost, other)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for name in ("n3", "n4"):  # leave the shared cluster as it was (the lost node is dead already)
            if cluster.node_processes(name):
                cluster.kill_node(name)
        # and wait until the GCS knows: the next test's actors were once placed on a killed node
        cluster.wait_nodes(2, 120, at_most=True)
    text = log.read_text()
    assert "rollout engine 0 removed from the pool" in text, text[-3000:]
    assert "engine(s) [1] serving" in text, text[-3000:]  # the replacement got the weights and served
    got = grpo_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert_one_version_per_update(got)
    assert max(r["staleness_max"] for r in got) <= 1
    assert got[-1]["rollout_engines_died"] == 1 and got[-1]["rollout_engines_replaced"] == 1
    assert got[-1]["samples_dropped_actor_died"] >= 2  # the request in flight on the lost node
    summary = json.load(open(run_dir / "summary.json"))["samples"]["1-grpo"]
    assert summary["trained"] == steps * 4 * 2
