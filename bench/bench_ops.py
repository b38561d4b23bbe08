"""Cluster operations, measured on a `ray start` cluster on this machine:

1. the cost of scaling rollout 1 -> 2 engines during a GRPO stage: step time, samples/s of the job
   and tokens/s per engine, over the steps before and after the second engine serves;
2. the time from an engine's death (``kill -9`` from outside) to its replacement serving.

    .venv/bin/python bench/bench_ops.py [--steps 400]

Prints one table; nothing is asserted (tests/test_scaling.py and tests/test_faults.py check the
behaviour).
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.cluster_fixture import RayCluster, wait_for  # noqa: E402
from tests.test_faults import grpo_rows, start_job  # noqa: E402


def control(cluster, *args) -> str:
    out = subprocess.run([sys.executable, "-m", "cluster.control", *args], capture_output=True, text=True,
                         timeout=180, env={**cluster.env, "RAY_ADDRESS": cluster.gcs_address})
    if out.returncode:
        raise RuntimeError(out.stdout + out.stderr)
    return out.stdout


def window(rows: list[dict]) -> dict:
    t = [r["time_step_s"] for r in rows]
    per_engine = [v for r in rows for k, v in r.items() if k.startswith("engine_tokens_per_s/")]
    return {"steps": len(rows), "step_s": statistics.median(t), "samples_per_s": len(rows) * 8 / sum(t),
            "tokens_per_s_per_engine": statistics.mean(per_engine) if per_engine else 0.0,
            "gen_tokens_per_s": statistics.mean(r["gen_tokens_per_s"] for r in rows)}


def stamp(line: str) -> float:
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000, help="long enough to outlast the measurement (the job is killed after it)")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="aha-bench-ops-")
    cluster = RayCluster(head_cpus=4, node_cpus=4).start()  # what the tests run on (tests/conftest.py)
    try:
        proc, run_dir, log = start_job(cluster, __import__("pathlib").Path(tmp), "ops", [
            f"stages.1.steps={a.steps}", "rollout.num_actors=1", "algo.max_staleness=1",
            "rollout.max_tokens=24"])
        try:
            wait_for(lambda: len(grpo_rows(run_dir)) >= 30, 600, proc, "30 steps")
            control(cluster, "scale", "ops", "rollout=2")
            wait_for(lambda: sum(r["pool_rollout"] == 2 for r in grpo_rows(run_dir)) >= 30, 600, proc,
                     "30 steps with 2 engines")
            rows = grpo_rows(run_dir)
            one = window([r for r in rows[5:] if r["pool_rollout"] == 1])
            two = window([r for r in rows if r["pool_rollout"] == 2][3:])
            victim = cluster.actors("RolloutActor", name_suffix="-1")[0]
            t_kill = time.time()
            os.kill(victim["pid"], signal.SIGKILL)
            serving = re.compile(r"rollout pool: engine\(s\) \[[\d, ]*\b2\b[\d, ]*\] serving")
            wait_for(lambda: serving.search(log.read_text()), 300, proc, "the replacement")
            lines = log.read_text().splitlines()
            replaced_s = stamp(next(x for x in lines if serving.search(x))) - t_kill
            died = next(x for x in lines if "rollout engine 1 " in x and "ERROR" in x)
            noticed_s = stamp(died) - t_kill
            # a kill inside a weight sync can take the other engine's receive down with it (its
            # gloo broadcast never completes): it is then replaced too; say which happened
            removed = [x.split("rollout engine ")[1].split(":")[0] for x in lines
                       if "removed from the pool" in x and stamp(x) >= t_kill - 1]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        cluster.stop()
    print(f"\nrollout pool 1 -> 2 engines (G=2 x 4 prompts per step, 24 new tokens; {os.cpu_count()} cores)")
    print(f"{'':28}{'1 engine':>12}{'2 engines':>12}{'ratio':>8}")
    for k in ("step_s", "samples_per_s", "gen_tokens_per_s", "tokens_per_s_per_engine"):
        print(f"{k:28}{one[k]:12.3f}{two[k]:12.3f}{two[k] / one[k]:8.2f}")
    print(f"(steps measured: {one['steps']} and {two['steps']})")
    print(f"\nengine killed -> death noticed {noticed_s:.1f} s -> replacement serving {replaced_s:.1f} s")
    print("removed after the kill: " + "; ".join(f"engine {x}" for x in removed))


if __name__ == "__main__":
    main()
