"""``aha sandbox FILE.py [--stdin FILE] [--tests TESTS.json] [--timeout S] [--memory MB]``

Runs FILE.py in the sandbox (rewards.sandbox) and prints the result as one JSON object:
``{"status", "stdout", "stderr", "exit_code", "wall_s", "reason"}``. With ``--tests`` (a JSON list of
``{"stdin": ..., "expected": ...}``) the program runs once per test and the object gains ``passed``,
``total`` and ``tests`` (per-test status); stdout/stderr are then those of the first failing test
(or the last test). Exit code: 0 if the run (or every test) passed, 1 otherwise, 2 on bad usage.

Also: ``python -m rewards.cli sandbox FILE.py ...``.
"""
from __future__ import annotations

import argparse
import json
import sys


def sandbox_main(argv: list[str]) -> int:
    from rewards.code import outputs_match
    from rewards.sandbox import become_subreaper, execute

    ap = argparse.ArgumentParser(prog="aha sandbox", description="Run a Python file in the reward sandbox.")
    ap.add_argument("file", help="Python source file to run")
    ap.add_argument("--stdin", help="file whose content is the program's stdin")
    ap.add_argument("--tests", help='JSON list of {"stdin": ..., "expected": ...}')
    ap.add_argument("--timeout", type=float, default=2.0, help="wall-clock seconds per run (default 2)")
    ap.add_argument("--memory", type=int, default=256, help="address-space limit in MB (default 256)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    try:
        with open(args.file, encoding="utf-8") as f:
            source = f.read()
        stdin = ""
        if args.stdin:
            with open(args.stdin, encoding="utf-8") as f:
                stdin = f.read()
        tests = None
        if args.tests:
            with open(args.tests, encoding="utf-8") as f:
                tests = json.load(f)
            if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
                raise ValueError("--tests must hold a JSON list of objects")
    except (OSError, ValueError) as e:
        print(json.dumps({"status": "usage_error", "reason": str(e)}))
        return 2
    become_subreaper()
    if tests is None:
        r = execute(source, stdin=stdin, timeout_s=args.timeout, memory_mb=args.memory)
        print(json.dumps(r.to_dict()))
        return 0 if r.status == "ok" else 1
    statuses, shown, passed = [], None, 0
    for t in tests:
        r = execute(source, stdin=str(t.get("stdin", "")), timeout_s=args.timeout, memory_mb=args.memory)
        s = r.status if r.status != "ok" else ("passed" if outputs_match(r.stdout, str(t.get("expected", ""))) else "wrong_answer")
        statuses.append(s)
        passed += s == "passed"
        if shown is None and s != "passed":
            shown = r
        last = r
    out = (shown or last).to_dict() if tests else {"status": "ok", "stdout": "", "stderr": "", "exit_code": None,
                                                     "wall_s": 0.0, "reason": "no tests"}
    out.update(passed=passed, total=len(tests), tests=statuses)
    print(json.dumps(out))
    return 0 if passed == len(tests) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "sandbox":
        print("usage: python -m rewards.cli sandbox FILE.py [--stdin FILE] [--tests TESTS.json] [--timeout S]",
              file=sys.stderr)
        return 2
    return sandbox_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
