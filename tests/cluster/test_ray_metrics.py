"""The job's metrics on Ray's Prometheus endpoint (cluster/ray_metrics.py).

The row -> metric mapping is checked on hand-made rows (no Ray). The end-to-end test starts a real
Ray head (``ray start --head --metrics-export-port``), runs a 3-step GRPO job against it through
the CLI, scrapes ``/metrics`` over HTTP while it runs and after, and compares with the job's own
metrics.jsonl. Ray reports each process's metrics every ``RAY_metrics_report_interval_ms`` (1 s
here, the floor) and drops a gauge not set for two intervals: the last step's gauges are served
from that row until ~2 intervals after the job's publisher exits (RunLogger.close), so they are
caught by scraping while the job runs; counters stay after it ends. Runs in ~100 s on 2 cores.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import yaml

from cluster.ray_metrics import (BY_NAME, GAUGE, MAX_GENERIC, MAX_LABEL_VALUES, STAGE_TOTAL, STEP,
                                 MetricsPublisher, RowMetrics, dashboard_json, markdown_table)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def by_name(points):
    return {(p.name, tuple(sorted((k, v) for k, v in p.tags.items() if k not in ("run", "stage")))): p
            for p in points}


def test_gauges_take_the_row_and_counters_the_growth_of_running_totals():
    rm = RowMetrics("r")
    first = by_name(rm.points({
        "stage": "1-grpo", "step": 1, "reward_mean": 0.0, "samples_generated": 32, "samples_dropped": 0,
        "samples_dropped_stale": 0, "samples_masked_truncated": 3, "reward_pool/verifications": 32.0,
        "time_train_s": 1.5, "gen_tokens_per_s": 100.0, "time_generate_s": 2.0, "sync_bytes": 2e9,
        "time_sync_s": 4.0, "reward_reason/timeout (0/3 passed): slow": 2, "flag": True, "note": "x"}))
    assert first[("aha_reward_mean", ())].value == 0.0  # a gauge at 0 is still set
    assert first[("aha_step", ())].value == 1
    assert first[("aha_samples_generated", ())].value == 32
    assert ("aha_samples_dropped", (("reason", "stale"),)) not in first  # a counter adds only > 0
    assert first[("aha_samples_masked", (("reason", "truncated"),))].value == 3
    assert first[("aha_phase_seconds", (("phase", "train"),))].value == 1.5
    assert first[("aha_tokens_generated", ())].value == 200
    assert first[("aha_sync_gb_per_s", ())].value == pytest.approx(0.5)
    assert first[("aha_reward_reasons", (("reason", "timeout"),))].value == 2
    assert {p.tags["run"] for p in first.values()} == {"r"}
    assert not [k for k in first if k[0] in ("aha_flag", "aha_note", "aha_samples_dropped_total")]

    second = by_name(rm.points({"stage": "1-grpo", "step": 2, "samples_generated": 56,
                                "samples_dropped_stale": 4, "samples_masked_truncated": 0,
                                "reward_pool/verifications": 64.0}))
    assert second[("aha_samples_generated", ())].value == 24  # 56 - 32
    assert second[("aha_samples_dropped", (("reason", "stale"),))].value == 4
    assert ("aha_samples_masked", (("reason", "truncated"),)) not in second  # per step: 0 adds nothing
    assert second[("aha_reward_verifications", ())].value == 32

    # a new stage: its own running totals start at 0; the reward actors' totals go on
    third = by_name(rm.points({"stage": "2-grpo", "step": 1, "samples_generated": 16,
                               "reward_pool/verifications": 80.0}))
    assert third[("aha_samples_generated", ())].value == 16
    assert third[("aha_reward_verifications", ())].value == 16
    assert {p.tags["stage"] for p in third.values()} == {"2-grpo"}
    # a total that went down restarted (a new reward pool): counted whole
    again = by_name(rm.points({"stage": "2-grpo", "step": 2, "reward_pool/verifications": 8.0}))
    assert again[("aha_reward_verifications", ())].value == 8


def test_the_step_is_never_a_label_and_labels_and_names_stay_bounded():
    rm = RowMetrics("r")
    rows = [{"stage": "s", "step": i, "global_step": i, f"reward_reason/reason{i}": 1, f"extra_{i}": 1.0,
             "code_mean": 0.5} for i in range(1, 2 * MAX_GENERIC)]
    points = [p for row in rows for p in rm.points(row)]
    assert {k for p in points for k in p.tags} == {"run", "stage", "reason"}
    reasons = {p.tags["reason"] for p in points if p.name == "aha_reward_reasons"}
    assert len(reasons) == MAX_LABEL_VALUES + 1 and "other" in reasons
    generic = {p.name for p in points if p.name not in BY_NAME}
    assert len(generic) == MAX_GENERIC and "aha_code_mean" in generic  # a reward component's mean
    assert all(p.kind == GAUGE for p in points if p.name in generic)
    assert rm.skipped  # the keys beyond MAX_GENERIC
    assert BY_NAME["aha_samples_generated"].kind == STAGE_TOTAL and BY_NAME["aha_samples_masked"].kind == STEP


def test_the_shipped_dashboard_and_metric_list_match_the_table():
    with open(os.path.join(ROOT, "docs", "grafana", "aha_dashboard.json")) as f:
        assert f.read() == dashboard_json(), "regenerate: python -m cluster.ray_metrics --grafana"
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        assert markdown_table() in f.read(), "regenerate the table: python -m cluster.ray_metrics"
    exprs = [t["expr"] for p in json.loads(dashboard_json())["panels"] for t in p["targets"]]
    assert all("step=" not in e for e in exprs) and len(exprs) > 20


# ---- against a real Ray head ------------------------------------------------------------------
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict:
    """``{(name, labels...): value}`` of the aha series on the endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_aha_"):
                labels = {k: v for k, v in s.labels.items() if k in ("run", "stage", "reason", "phase")}
                out[(s.name, *sorted(labels.items()))] = s.value
                assert "step" not in s.labels and "global_step" not in s.labels, s
    return out


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of its own (ports, temp dir, process group); stopped by killing that group and
    whatever else runs from its temp dir (``ray stop`` would stop every Ray on the machine)."""
    import psutil

    tmp = tempfile.mkdtemp(prefix="aha-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    port, metrics = free_port(), free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_metrics_report_interval_ms": "1000"}
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    # 3 CPUs: the demo's rollout (1), reward (0.5) and learner (1) actors
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--temp-dir={tmp}", f"--port={port}", "--num-cpus=3",
         f"--metrics-export-port={metrics}", "--include-dashboard=false", "--disable-usage-stats",
         f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}"],
        env=env, start_new_session=True, stdout=open(os.path.join(tmp, "head.log"), "w"),
        stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while True:
            assert head.poll() is None, open(os.path.join(tmp, "head.log")).read()[-3000:]
            try:
                scrape(metrics)
                break
            except OSError:
                assert time.time() < deadline, "the metrics endpoint did not answer within 90 s"
                time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "metrics": metrics, "env": env}
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # SIGTERM would drain for up to 30 s first
        except ProcessLookupError:
            pass
        head.wait()
        left = [p for p in psutil.process_iter(["cmdline"]) if any(tmp in a for a in p.info["cmdline"] or [])]
        for p in left:
            p.kill()
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for(cond, timeout_s, what):
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.2)


def test_the_publisher_keeps_its_gauges_and_its_counters_outlive_it(ray_head):
    """Set once, a gauge is still served 4 report intervals later (Ray alone drops it after 2);
    once the publisher exits its gauge goes, its counter stays."""
    import ray
    from ray._private.authentication.authentication_token_setup import \
        maybe_enable_token_auth_if_token_available
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # as cluster.controller.start_ray
    port, tags = ray_head["metrics"], (("run", "pub"), ("stage", "s"))
    step, total = ("ray_aha_step", *tags), ("ray_aha_samples_generated_total", *tags)
    ray.init(address=ray_head["address"])
    try:
        pub = ray.remote(num_cpus=0)(MetricsPublisher).remote()
        ray.get(pub.record.remote(RowMetrics("pub").points({"stage": "s", "step": 7, "samples_generated": 5})))
        wait_for(lambda: scrape(port).get(step) == 7, 15, "the gauge served")
        time.sleep(4.0)
        got = scrape(port)
        assert got.get(step) == 7 and got.get(total) == 5, got
        pub.__ray_terminate__.remote()  # what RunLogger.close does
        wait_for(lambda: step not in scrape(port), 15, "the gauge gone after the publisher exits")
        assert scrape(port).get(total) == 5
    finally:
        ray.shutdown()


def test_a_running_job_is_served_on_the_metrics_endpoint(ray_head, tmp_path):
    port = ray_head["metrics"]
    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster", "configs", "demo.yaml")))
    cfg["stages"] = [{"type": "grpo", "steps": 3}]
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    args = [sys.executable, "-m", "cluster.cli", "train", str(cfg_path), f"run.root={tmp_path}",
            "run.name=metrics", "rollout.group_size=2", "algo.prompts_per_step=4",
            "rollout.prompts_per_request=4", "rollout.max_tokens=16", "eval.num_prompts=0"]
    log_path = tmp_path / "job.log"
    proc = subprocess.Popen(args, cwd=ROOT, env={**ray_head["env"], "RAY_ADDRESS": ray_head["address"]},
                            start_new_session=True, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    scrapes = []  # what the endpoint served, every 0.2 s while the job ran
    try:
        deadline = time.time() + 300
        while proc.poll() is None:
            assert time.time() < deadline, "the job did not finish within 300 s"
            scrapes.append(scrape(port))
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert (last["stage"], last["step"], last["weight_version"]) == ("0-grpo", 3, 3)
    tags = (("run", "metrics"), ("stage", "0-grpo"))

    def gauge(name, *extra):  # the values the series showed, in order
        key = (f"ray_aha_{name}", *sorted(tags + extra))
        return [s.get(key) for s in scrapes]

    # the last step's gauges, as metrics.jsonl has them, were served with the run and stage labels
    for key in ("step", "weight_version", "reward_mean", "accuracy_mean", "format_mean", "kl",
                "entropy", "clip_frac", "response_len_mean", "staleness_mean", "gen_tokens_per_s"):
        assert pytest.approx(last[key], rel=1e-9) in gauge(key), (key, last[key], set(gauge(key)))
    assert pytest.approx(last["time_train_s"], rel=1e-9) in gauge("phase_seconds", ("phase", "train"))
    # after the job: counters hold the job's totals; its gauges are gone (2 report intervals)
    time.sleep(3.5)
    after = scrape(port)
    assert after[("ray_aha_samples_generated_total", *tags)] == last["samples_generated"]
    assert after[("ray_aha_samples_trained_total", *tags)] == last["samples_trained"]
    assert after[("ray_aha_reward_samples_total", *tags)] == last["reward_pool/samples"] > 0
    dropped = {dict(k[1:])["reason"]: v for k, v in after.items() if k[0] == "ray_aha_samples_dropped_total"}
    assert dropped == {k[len("samples_dropped_"):]: v for k, v in last.items()
                       if k.startswith("samples_dropped_") and v}
    assert not [k for k in after if k[0] == "ray_aha_reward_mean" and ("run", "metrics") in k]
