"""Per-run cost of the code sandbox and of its seccomp filter, side by side in one run.

Three ways to run the same tiny program (``print(sum(range(1000)))``), interleaved round by round so
machine noise hits all three alike:
  bare      ``python3 -I -S -c`` as a plain subprocess (no isolation);
  sandbox   ``rewards.sandbox.execute(..., seccomp=False)`` (bubblewrap, fresh uid, limits);
  seccomp   ``rewards.sandbox.execute(...)``, the default (the above plus the filter and
            --disable-userns).
Prints the median and p90 wall time of each and the ratios.

Then math checks per second on one core, with the math workers isolated (``reward.isolation:
sandbox``, the default: bubblewrap, the same filter, a fresh uid) and not (``none``): one scorer of
each, one worker each, unique LaTeX answers (no cache hits, every check goes to math-verify in the
worker), batches alternating between the two; plus the worker start-up time of each.

    .venv/bin/python bench/bench_sandbox.py [--rounds 200] [--math-batches 10 --math-n 128]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

PROG = "print(sum(range(1000)))"


def bare() -> float:
    t0 = time.perf_counter()
    subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", PROG], capture_output=True, check=True)
    return time.perf_counter() - t0


def boxed(seccomp: bool) -> float:
    from rewards.sandbox import execute

    t0 = time.perf_counter()
    r = execute(PROG, timeout_s=5, seccomp=seccomp)
    dt = time.perf_counter() - t0
    if r.status != "ok" or r.stdout != "499500\n":
        raise RuntimeError(f"sandbox run failed: {r}")
    return dt


def bench_math(batches: int, n: int) -> None:
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_rewards import math_inputs

    from rewards import RewardConfig, build_scorer

    scorers, startup = {}, {}
    for mode in ("none", "sandbox"):
        t0 = time.perf_counter()
        scorers[mode] = build_scorer(RewardConfig(weights={"accuracy": 1.0}, workers_per_actor=1, isolation=mode,
                                                  options={"accuracy": {"cache_size": 0}}))
        scorers[mode].warm_up()
        startup[mode] = time.perf_counter() - t0
        scorers[mode].score_batch(math_inputs(32, 90_000_000, "latex"))  # warm the worker's own caches
    rates: dict[str, list[float]] = {m: [] for m in scorers}
    try:
        for b in range(batches):
            for mode, s in scorers.items():
                batch = math_inputs(n, 1_000_000 * (b + 1), "latex")
                t0 = time.perf_counter()
                rs = s.score_batch(batch)
                rates[mode].append(n / (time.perf_counter() - t0))
                if not 0 < sum(r.components["accuracy"] for r in rs) < n:
                    raise RuntimeError(f"math checks look wrong with isolation={mode}")
    finally:
        for s in scorers.values():
            s.close()
    print(f"\nmath checks/s on one worker (one core), {batches} batches of {n} unique LaTeX answers, alternating")
    print(f"{'isolation':10s} {'median/s':>9s} {'min/s':>7s} {'max/s':>7s} {'vs none':>8s} {'start':>7s}")
    med = {m: statistics.median(v) for m, v in rates.items()}
    for m, v in rates.items():
        print(f"{m:10s} {med[m]:9.1f} {min(v):7.1f} {max(v):7.1f} {med[m] / med['none']:7.3f}x {startup[m]:6.2f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--math-batches", type=int, default=10)
    ap.add_argument("--math-n", type=int, default=128)
    a = ap.parse_args()
    kinds = {"bare": bare, "sandbox": lambda: boxed(False), "seccomp": lambda: boxed(True)}
    for f in kinds.values():  # warm caches (page cache, the filter's one-time build)
        f()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(a.rounds):
        for k, f in kinds.items():
            times[k].append(f())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{a.rounds} rounds, interleaved; wall time per run")
    print(f"{'':10s} {'median':>9s} {'p90':>9s} {'vs bare':>8s} {'vs sandbox':>10s}")
    for k, v in times.items():
        p90 = statistics.quantiles(v, n=10)[-1]
        print(f"{k:10s} {med[k] * 1e3:8.1f}ms {p90 * 1e3:8.1f}ms {med[k] / med['bare']:7.2f}x "
              f"{med[k] / med['sandbox']:9.3f}x")
    if a.math_batches:
        bench_math(a.math_batches, a.math_n)


if __name__ == "__main__":
    main()
