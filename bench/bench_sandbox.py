"""Per-run cost of the code sandbox and of its seccomp filter, side by side in one run.

Three ways to run the same tiny program (``print(sum(range(1000)))``), interleaved round by round so
machine noise hits all three alike:
  bare      ``python3 -I -S -c`` as a plain subprocess (no isolation);
  sandbox   ``rewards.sandbox.execute(..., seccomp=False)`` (bubblewrap, fresh uid, limits);
  seccomp   ``rewards.sandbox.execute(...)``, the default (the above plus the filter and
            --disable-userns).
Prints the median and p90 wall time of each and the ratios.

    .venv/bin/python bench/bench_sandbox.py [--rounds 200]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
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


if __name__ == "__main__":
    main()
