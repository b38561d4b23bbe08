"""GRPO step-time breakdown on the embedded default job, synchronous vs one-step asynchronous.

Runs the demo job twice in one process (same machine state, side by side): ``max_staleness=0``
(generate, then train) and ``max_staleness=1`` (generate the next batch while training). For each
it reports, per GRPO step, the controller's phase timers (wait_rollout, advantage, train, sync),
the time the actors spent generating and scoring, and ``other``: step wall time outside every
controller phase, i.e. the controller's own overhead, as a share of wall time.

    python bench/step_breakdown.py [--steps 8] [--sft-steps 60] [extra dotted overrides ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

PHASES = ["wait_rollout", "advantage", "train", "sync", "eval", "checkpoint"]


def run_job(root: str, name: str, overrides: list[str]) -> list[dict]:
    from cluster.cli import DEMO_CONFIG
    from cluster.config import load_config
    from cluster.controller import Controller, start_ray

    cfg = load_config(DEMO_CONFIG, [f"run.root={root}", f"run.name={name}", "run.tensorboard=false",
                                    "eval.num_prompts=16", *overrides])
    start_ray(cfg)
    Controller(cfg).run()
    with open(os.path.join(root, name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["stage"].endswith("grpo")][1:]  # first step includes warm-up


def summarize(rows: list[dict]) -> dict[str, float]:
    med = {p: statistics.median(r.get(f"time_{p}_s", 0.0) for r in rows) for p in PHASES}
    step = statistics.median(r["time_step_s"] for r in rows)
    med["step"] = step
    med["other"] = statistics.median(
        r["time_step_s"] - sum(r.get(f"time_{p}_s", 0.0) for p in PHASES) for r in rows)
    med["generate (actor)"] = statistics.median(r["time_generate_s"] for r in rows)
    med["reward (actor)"] = statistics.median(r["time_reward_s"] for r in rows)
    med["tokens/s"] = statistics.median(r["gen_tokens_per_s"] for r in rows)
    return med


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="aha-bench-")
    common = [f"stages.0.steps={a.sft_steps}", f"stages.1.steps={a.steps + 1}", *a.overrides]
    res = {s: summarize(run_job(root, f"staleness{s}", [f"algo.max_staleness={s}", *common]))
           for s in (0, 1)}
    keys = ["step", *PHASES, "other", "generate (actor)", "reward (actor)", "tokens/s"]
    print(f"\nmedian seconds per GRPO step over {a.steps} steps (first step dropped)")
    print(f"{'':>18} {'staleness 0':>12} {'staleness 1':>12}")
    for k in keys:
        print(f"{k:>18} {res[0][k]:>12.3f} {res[1][k]:>12.3f}")
    for s in (0, 1):
        print(f"staleness {s}: controller outside its phases {100 * res[s]['other'] / res[s]['step']:.2f}% "
              f"of step wall time")
    print(f"async speed-up (step time staleness 0 / staleness 1): {res[0]['step'] / res[1]['step']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
