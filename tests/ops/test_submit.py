"""``aha submit|status|logs`` against a real two-node cluster (tests/cluster_fixture.py), and the
job-control actor API that ``aha status|scale|stop`` talk to.

One tiny GRPO job (built-in tiny model, 2 steps) is submitted with its config *outside* the
project (so it is shipped), from a directory whose ``runs/`` must receive the run directory, with
its rollout engine placed on the second node by ``run.rollout_resources``."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AHA = [sys.executable, "-m", "cluster.cli"]
TINY = {
    "model": {"path": "tiny"},
    "data": {"train": "arithmetic", "test": "arithmetic", "max_operand": 10},
    "rollout": {"num_actors": 1, "group_size": 2, "prompts_per_request": 2, "max_tokens": 8,
                "template": "r1_zero_compact", "dtype": "float32", "weight_transport": "torch_dist"},
    "reward": {"weights": {"accuracy": 1.0, "format": 0.1}, "num_actors": 1},
    "learner": {"backend": "torch", "num_actors": 1, "lr": 1.0e-4, "mini_batches": 1, "micro_batch_size": 8},
    "algo": {"prompts_per_step": 2, "max_staleness": 0},
    "eval": {"num_prompts": 2, "k": 1},
    # the engine on node2, the learner and the reward actor anywhere
    "run": {"name": "submit-tiny", "dashboard": False, "tensorboard": False, "rollout_cpus": 1,
            "reward_cpus": 0.5, "learner_cpus": 0.5, "rollout_resources": {"node2": 1}},
    "stages": [{"type": "grpo", "steps": 2}],
}


def aha(cluster, *args, cwd=REPO, timeout=300):
    return subprocess.run([*AHA, *args], env=cluster.env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_the_cluster_has_two_nodes(ray_cluster):
    nodes = [n for n in ray_cluster.nodes() if n["alive"]]
    assert len(nodes) == 2
    assert sorted("node2" in n["resources"] for n in nodes) == [False, True]


def test_a_bad_config_fails_before_submitting(ray_cluster):
    out = aha(ray_cluster, "submit", "cluster/configs/demo.yaml", "rollout.group_size=1",
              "--address", ray_cluster.dashboard_url)
    assert out.returncode == 2, out.stderr
    assert "aha: bad config: rollout.group_size must be >= 2" in out.stderr
    listed = aha(ray_cluster, "status", "--json", "--address", ray_cluster.dashboard_url)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


def test_status_of_an_unknown_job_fails_clearly(ray_cluster):
    out = aha(ray_cluster, "status", "aha-nope-000000", "--address", ray_cluster.dashboard_url)
    assert out.returncode == 2
    assert "aha: no job 'aha-nope-000000'" in out.stderr


def engine_nodes(cluster, url: str) -> tuple[dict, list]:
    """Every RolloutActor the cluster has had (actor id -> node id), and the ids of node2's nodes."""
    where = cluster.python(
        "import json\nfrom ray.util.state import list_actors, list_nodes\n"
        f"a = list_actors(address={url!r}, filters=[('class_name', '=', 'RolloutActor')])\n"
        f"n = list_nodes(address={url!r}, detail=True)\n"
        "print(json.dumps([{x.actor_id: x.node_id for x in a}, "
        "[x.node_id for x in n if 'node2' in x.resources_total]]))")
    assert where.returncode == 0, where.stderr[-3000:]
    return tuple(json.loads(where.stdout.strip().splitlines()[-1]))


def test_submitted_job_runs_on_the_cluster(ray_cluster, tmp_path):
    cfg = tmp_path / "tiny.yaml"  # outside the project: shipped with the job
    cfg.write_text(yaml.safe_dump(TINY))
    url = ray_cluster.dashboard_url
    before = engine_nodes(ray_cluster, url)[0].keys()
    sub = aha(ray_cluster, "submit", str(cfg), "--no-follow", "--address", url, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().splitlines()[-1]
    assert job.startswith("aha-submit-tiny-")

    # while it runs, `aha status JOB` reaches its controller (through a control job)
    seen = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        st = aha(ray_cluster, "status", job, "--json", "--address", url)
        assert st.returncode == 0, st.stderr
        st = json.loads(st.stdout)
        if st["status"] not in ("PENDING", "RUNNING"):
            break
        if "error" not in st.get("control", {"error": "not running yet"}):
            seen = st
            if st["control"].get("stage"):
                break
        time.sleep(1)
    assert seen is not None, "aha status never reached the running job's controller"
    assert seen["control"]["job"] == job and seen["control"]["state"] in ("starting", "running")

    follow = aha(ray_cluster, "logs", job, "--address", url)  # follows until the job ends
    assert follow.returncode == 0, follow.stdout[-4000:] + follow.stderr[-2000:]
    assert f"aha: job {job} SUCCEEDED" in follow.stderr

    run_dir = tmp_path / "runs" / "submit-tiny"  # run.root defaults to <cwd of aha submit>/runs
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    done = json.loads(aha(ray_cluster, "status", job, "--json", "--address", url).stdout)
    assert done["status"] == "SUCCEEDED" and done["run_dir"] == str(run_dir)
    human = aha(ray_cluster, "status", job, "--address", url).stdout
    assert f"job {job}: SUCCEEDED" in human and f"run dir: {run_dir}" in human
    listed = aha(ray_cluster, "status", "--address", url)
    assert job in listed.stdout and "SUCCEEDED" in listed.stdout
    assert "ahactl-" not in listed.stdout  # control jobs are not listed
    # ... and the dashboard's Jobs page (its /api/jobs/) shows them as succeeded, not as failed
    req = urllib.request.Request(f"{url}/api/jobs/",
                                 headers={"Authorization": f"Bearer {ray_cluster.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        page = json.load(r)
    ctl = [(j.get("submission_id"), j.get("status"), j.get("message")) for j in page
           if (j.get("submission_id") or "").startswith("ahactl-")]
    assert ctl and all(st == "SUCCEEDED" for _, st, _ in ctl), [c for c in ctl if c[1] != "SUCCEEDED"]

    # the engine ran on node2 (Ray's state API keeps dead actors: those of jobs before this one
    # on the shared cluster are left out)
    engines, node2 = engine_nodes(ray_cluster, url)
    assert engines.keys() - before and {engines[a] for a in engines.keys() - before} == set(node2)


# ---- the control actor ------------------------------------------------------------------------------

def control_driver(gcs_address: str) -> None:
    """Run in a subprocess that joins the cluster: the controller's side of a JobControl, driven
    by ``python -m cluster.control`` processes as a user's ``aha`` would."""
    import ray

    from cluster.control import Control, control_name

    def cli(*args):
        return subprocess.Popen([sys.executable, "-m", "cluster.control", *args, "--address", gcs_address],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def answer(p):
        out, err = p.communicate(timeout=120)
        return p.returncode, json.loads(out.strip().splitlines()[-1]), err

    ray.init(address=gcs_address, log_to_driver=False)  # an anonymous namespace, as `aha train`'s
    ctl = Control.start("t-1")
    actor = ctl.actor
    assert ray.get(actor.status.remote())["state"] == "starting"
    assert ctl.poll() == []
    seq = ray.get(actor.request.remote("scale", {"pool": "rollout", "n": 2}))
    assert ray.get(actor.result.remote(seq)) is None
    assert ctl.poll() == [{"seq": seq, "kind": "scale", "args": {"pool": "rollout", "n": 2}}]
    assert ctl.poll() == []  # taken once
    ctl.ack(seq, {"ok": True, "message": "rollout pool 1 -> 2"})
    assert ray.get(actor.result.remote(seq))["ok"] is True
    assert Control.start("t-1").actor._actor_id == actor._actor_id  # get_if_exists
    from ray.util.state import get_actor
    here = ray.get_runtime_context().get_node_id()  # on the driver's node: it lives as long as the job
    assert get_actor(actor._actor_id.hex()).node_id == here

    ctl.publish({"state": "running", "stage": "0-grpo", "stage_type": "grpo", "step": 3, "steps": 10,
                 "weight_version": 3, "pools": {"rollout": 1, "reward": 1}, "last_row": {"reward_mean": 0.5},
                 "run_dir": "/x/runs/t"})
    rc, st, _ = answer(cli("status", "t-1"))
    assert rc == 0 and st["stage"] == "0-grpo" and st["step"] == 3 and st["pools"] == {"rollout": 1, "reward": 1}

    p = cli("scale", "t-1", "rollout=3", "reward=2", "--timeout", "60")
    acked = []
    deadline = time.monotonic() + 60
    while len(acked) < 2 and time.monotonic() < deadline:
        for req in ctl.poll():
            ctl.ack(req["seq"], {"ok": True, "message": f"{req['args']['pool']} -> {req['args']['n']}"})
            acked.append(req["args"])
        time.sleep(0.1)
    rc, out, err = answer(p)
    assert rc == 0 and out["ok"], (out, err)
    assert acked == [{"pool": "rollout", "n": 3}, {"pool": "reward", "n": 2}]
    assert out["message"] == "rollout -> 3; reward -> 2"

    rc, out, _ = answer(cli("stop", "t-1", "--timeout", "1"))  # nobody answers
    assert rc == 1 and out["timeout"] and "did not answer" in out["message"]
    assert [r["kind"] for r in ctl.poll()] == ["stop"]

    rc, out, err = answer(cli("status", "no-such-job"))
    assert rc == 2 and not out["ok"] and control_name("no-such-job") in err
    ray.shutdown()


def test_control_actor_api_and_cli(ray_cluster):
    out = ray_cluster.python(f"from tests.ops.test_submit import control_driver; "
                             f"control_driver({ray_cluster.gcs_address!r})", timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]


def test_scale_arguments_are_checked_before_anything_is_sent():
    from cluster.control import parse_scale

    assert parse_scale(["rollout=2", "reward=1"]) == [{"pool": "rollout", "n": 2}, {"pool": "reward", "n": 1}]
    for bad in (["rollout=0"], ["learner=2"], ["rollout"], []):
        with pytest.raises(ValueError):
            parse_scale(bad)


def test_status_lines_name_stage_step_pools_and_numbers():
    from cluster.jobs import format_status

    text = format_status({
        "job": "aha-x-1", "status": "RUNNING", "start_time": 0, "end_time": None, "run_dir": "/r/x",
        "control": {"state": "running", "stage": "1-grpo", "stage_type": "grpo", "step": 3, "steps": 10,
                    "weight_version": 3, "age_s": 0.5, "pools": {"pool_rollout": 2, "pool_reward": 1,
                                                                 "rollout_engines_died": 0},
                    "last_row": {"reward_mean": 0.25, "kl": 0.001, "phase": "x"}}})
    assert text.splitlines()[1:] == [
        "  stage 1-grpo (grpo): step 3/10, weight version 3, running (published 0.5s ago)",
        "  pools: rollout 2, reward 1", "  last step: reward_mean 0.25, kl 0.001", "  run dir: /r/x"]
    stopped = format_status({"job": "aha-x-1", "status": "FAILED", "stopped_on_request": True, "start_time": 0,
                             "end_time": 0, "message": "failed with exit code 3\naha: stopped on request"})
    assert stopped.startswith("job aha-x-1: STOPPED (aha stop)") and "aha: stopped on request" in stopped


def test_a_cluster_on_this_machine_shares_its_filesystem():
    from cluster.jobs import is_this_machine, shipped_config

    assert is_this_machine("http://127.0.0.1:8265") and is_this_machine("auto")
    assert is_this_machine("localhost:6379") and not is_this_machine("http://203.0.113.254:8265")
    assert shipped_config(os.path.join(REPO, "cluster/configs/demo.yaml")) == "cluster/configs/demo.yaml"
    assert shipped_config(os.path.join(REPO, "runs/demo/config.yaml")) is None  # runs/ is not uploaded
    assert shipped_config("/elsewhere/job.yaml") is None
