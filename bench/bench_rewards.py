"""Reward throughput on this machine: math checks per second per core, and sandbox runs per second
with their overhead over a bare ``python3 -c pass`` subprocess, measured side by side.

    PYTHONPATH=. python bench/bench_rewards.py [--math-n 512] [--sandbox-n 40]

Prints one small table. No assertions: numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import RewardConfig, RewardInput, build_scorer  # noqa: E402
from rewards.sandbox import execute, find_python, sandbox_available  # noqa: E402


def math_inputs(n: int, offset: int, kind: str) -> list[RewardInput]:
    """Unique short answers (no cache hits), half of them wrong.
    kind 'int': integers (decided in the parent, no worker); 'latex': fractions and roots (math-verify)."""
    out = []
    for i in range(offset, offset + n):
        if kind == "int":
            pred, gold = str(i), str(i if i % 2 else i + 1)
        elif i % 2:
            pred, gold = f"\\frac{{{i}}}{{{i + 1}}}", f"{i}/{i + 1}" if i % 4 == 1 else f"{i + 2}/{i + 1}"
        else:
            pred, gold = f"{i}\\sqrt{{2}}", f"\\sqrt{{{2 * i * i}}}" if i % 4 == 0 else f"{i}\\sqrt{{3}}"
        out.append(RewardInput(f"ok</think><answer>{pred}</answer>", answer=gold))
    return out


def bench_math(workers: int, n: int) -> dict:
    cfg = RewardConfig(weights={"accuracy": 1.0, "format": 0.1}, workers_per_actor=workers,
                       options={"accuracy": {"cache_size": 0}})
    s = build_scorer(cfg)
    t = time.monotonic()
    s.warm_up()
    startup = time.monotonic() - t
    s.score_batch(math_inputs(64, 10_000_000, "latex"))          # warm caches in the workers
    t = time.monotonic()
    rs = s.score_batch(math_inputs(n, 0, "latex"))
    wall = time.monotonic() - t
    t = time.monotonic()
    s.score_batch(math_inputs(128, 20_000_000, "latex"))
    batch128 = time.monotonic() - t
    t = time.monotonic()
    s.score_batch(math_inputs(128, 30_000_000, "int"))
    batch128_int = time.monotonic() - t
    s.close()
    assert 0 < sum(r.components["accuracy"] for r in rs) < n
    return {"workers": workers, "per_s": n / wall, "per_s_per_core": n / wall / min(workers, os.cpu_count() or 1),
            "batch128_s": batch128, "batch128_int_s": batch128_int, "startup_s": startup}


def bench_sandbox(n: int) -> dict:
    py = find_python()
    bare, boxed = [], []
    for _ in range(n):  # interleaved, so both see the same machine load
        t = time.monotonic()
        subprocess.run([py, "-I", "-S", "-c", "pass"], check=True)
        bare.append(time.monotonic() - t)
        t = time.monotonic()
        r = execute("pass", timeout_s=10)
        boxed.append(time.monotonic() - t)
        assert r.status == "ok", r
    return {"bare_ms": 1000 * statistics.median(bare), "sandbox_ms": 1000 * statistics.median(boxed),
            "bare_per_s": 1 / statistics.mean(bare), "sandbox_per_s": 1 / statistics.mean(boxed)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--math-n", type=int, default=512)
    ap.add_argument("--sandbox-n", type=int, default=40)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    print(f"{'what':44s} {'value':>12s}")
    for w in (1, 2):
        m = bench_math(w, args.math_n)
        print(f"{'math-verify checks/s, %d worker(s)' % w:44s} {m['per_s']:12.0f}")
        print(f"{'math-verify checks/s per core, %d worker(s)' % w:44s} {m['per_s_per_core']:12.0f}")
        print(f"{'batch of 128 LaTeX answers, %d worker(s) [s]' % w:44s} {m['batch128_s']:12.3f}")
        print(f"{'batch of 128 integer answers, %d worker(s) [s]' % w:44s} {m['batch128_int_s']:12.4f}")
        print(f"{'worker pool start-up, %d worker(s) [s]' % w:44s} {m['startup_s']:12.2f}")
    ok, why = sandbox_available()
    if not ok:
        print(f"sandbox: skipped ({why})")
        return
    sb = bench_sandbox(args.sandbox_n)
    print(f"{'bare python3 -c pass, median [ms]':44s} {sb['bare_ms']:12.1f}")
    print(f"{'sandbox execute(pass), median [ms]':44s} {sb['sandbox_ms']:12.1f}")
    print(f"{'sandbox overhead per run, median [ms]':44s} {sb['sandbox_ms'] - sb['bare_ms']:12.1f}")
    print(f"{'bare runs/s (serial)':44s} {sb['bare_per_s']:12.1f}")
    print(f"{'sandbox runs/s (serial, one core)':44s} {sb['sandbox_per_s']:12.1f}")


if __name__ == "__main__":
    main()
