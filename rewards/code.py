"""Code accuracy: run model-written Python against tests in the sandbox (rewards.sandbox).

Test items (``RewardInput.tests``), both styles may be mixed:

- ``{"stdin": "...", "expected": "..."}`` — a stdin/stdout program (Codeforces, APPS, LiveCodeBench).
  One sandbox run per test; stdout is compared in the caller with ``expected`` token by token
  (whitespace-insensitive; numbers with a decimal point within ``float_tol`` if that option is set).
- ``{"assert": "assert f(1) == 2"}`` — a function checked by asserts (HumanEval, MBPP). All assert
  tests of a sample run in ONE sandbox process after the solution has been executed.
  An ``assert EXPR == LITERAL`` (either side literal) is split in the caller: only ``EXPR`` enters
  the sandbox, its value comes back encoded (exact built-in types only) and the caller compares it
  with ``LITERAL`` — so expected values are never visible to the program under test and cannot be
  forged. Any other test code runs as is inside the sandbox and reports pass/fail (its expected
  values are visible to the program; documented gap).
- ``{"setup": "..."}`` — code run before the assert tests (imports, helpers); not a test.

The exit code proves nothing: a stdin test passes only if stdout matches, an assert test only if
its result line (written on a private pipe) says so. Score: fraction of tests passed, or 1/0 with
``code_reward='all_or_nothing'`` (which stops at the first failing test).

Options (``config.options["code"]``): ``test_timeout_s`` (per sandbox run, default
``config.timeout_s``), ``memory_mb`` (256), ``max_tests`` (100), ``float_tol`` (None), ``nproc`` (16).
"""
from __future__ import annotations

import ast
import json
import math
import re

from rewards.config import RewardConfig
from rewards.extract import last_answer_block
from rewards.pool import Task
from rewards.registry import Verdict
from rewards.types import RewardInput

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

HARNESS = r'''
import json, os, sys
_fd = int(sys.argv[1])
_write = os.write
_dumps = json.dumps
_type = type
sys.argv = ["solution.py"]

def _enc(v, depth=0):
    t = _type(v)
    if depth > 50:
        raise ValueError("too deep")
    if v is None or t is bool:
        return {"k": repr(v)}
    if t is int:
        return {"i": str(v)}
    if t is float:
        return {"f": repr(v)}
    if t is complex:
        return {"c": [repr(v.real), repr(v.imag)]}
    if t is str:
        return {"s": v}
    if t is bytes:
        return {"b": v.hex()}
    if t in (list, tuple, set, frozenset):
        return {{list: "l", tuple: "t", set: "S", frozenset: "F"}[t]: [_enc(x, depth + 1) for x in v]}
    if t is dict:
        return {"d": [[_enc(k, depth + 1), _enc(x, depth + 1)] for k, x in v.items()]}
    raise TypeError("unsupported result type " + t.__name__)

def _report(obj):
    _write(_fd, (_dumps(obj) + "\n").encode())

with open("/sandbox/tests.json") as f:
    _tests = json.load(f)
with open("/sandbox/solution.py") as f:
    _src = f.read()
_ns = {"__name__": "solution", "__builtins__": __builtins__}
try:
    exec(compile(_src, "solution.py", "exec"), _ns)
except BaseException as e:
    _report({"setup_error": _type(e).__name__ + ": " + str(e)[:200]})
    os._exit(0)
for _i, _t in enumerate(_tests):
    try:
        if _t["mode"] == "setup":
            exec(compile(_t["code"], "setup.py", "exec"), _ns)
            continue
        if _t["mode"] == "value":
            _v = eval(compile(_t["expr"], "test_%d.py" % _i, "eval"), _ns)
            _report({"i": _t["i"], "ok": True, "value": _enc(_v)})
        else:
            exec(compile(_t["code"], "test_%d.py" % _i, "exec"), _ns)
            _report({"i": _t["i"], "ok": True})
    except SystemExit as e:
        _report({"i": _t.get("i"), "ok": False, "error": "SystemExit"})
        break
    except BaseException as e:
        _report({"i": _t.get("i"), "ok": False, "error": _type(e).__name__ + ": " + str(e)[:200]})
os._exit(0)  # skip atexit hooks the solution may have registered
'''


def extract_code(response: str) -> str | None:
    """The program: last fenced code block of the answer region (last <answer> block, else the
    whole response); else the answer block itself; else None."""
    block = last_answer_block(response)
    region = response if block is None else block
    fences = _FENCE.findall(region)
    if fences:
        return fences[-1]
    if block is not None and block.strip():
        return block
    return None


def split_assert(code: str):
    """('value', expr, expected) for ``assert EXPR == LITERAL``; ('exec', code, None) otherwise.

    >>> split_assert("assert add(1, 2) == 3")
    ('value', 'add(1, 2)', 3)
    >>> split_assert("assert abs(f(2) - 1.5) < 1e-6")[0]
    'exec'
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return "exec", code, None
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Assert) and tree.body[0].msg is None:
        test = tree.body[0].test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
            left, right = test.left, test.comparators[0]
            for expr, lit in ((left, right), (right, left)):
                try:
                    value = ast.literal_eval(lit)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    continue
                try:
                    ast.literal_eval(expr)
                    continue  # both sides literal: nothing to hide, run as is
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    return "value", ast.unparse(expr), value
    return "exec", code, None


def decode_value(obj):
    """Inverse of the harness encoder: plain built-in values only."""
    (k, v), = obj.items()
    if k == "k":
        return {"None": None, "True": True, "False": False}[v]
    if k == "i":
        return int(v)
    if k == "f":
        return float(v)
    if k == "c":
        return complex(float(v[0]), float(v[1]))
    if k == "s":
        return v
    if k == "b":
        return bytes.fromhex(v)
    if k in ("l", "t", "S", "F"):
        items = [decode_value(x) for x in v]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[k](items)
    if k == "d":
        return {decode_value(a): decode_value(b) for a, b in v}
    raise ValueError(f"bad encoded value {k!r}")


def outputs_match(actual: str, expected: str, float_tol: float | None = None) -> bool:
    """Token-wise comparison (whitespace-insensitive); decimal numbers within float_tol if given."""
    a, e = actual.split(), expected.split()
    if a == e:
        return True
    if float_tol is None or len(a) != len(e):
        return False
    for x, y in zip(a, e):
        if x == y:
            continue
        if "." not in y:
            return False
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if not math.isclose(fx, fy, rel_tol=float_tol, abs_tol=float_tol):
            return False
    return True


def run_code_task(payload: dict) -> dict:
    """Run one sample's tests in the sandbox (called inside a pool worker, or directly).

    payload: ``{"code", "tests", "timeout_s", "memory_mb", "nproc", "float_tol", "stop_on_fail"}``.
    Returns ``{"passed", "total", "statuses": [per-test status], "first_failure": str}``.
    """
    from rewards.sandbox import execute
    code, tests = payload["code"], payload["tests"]
    timeout_s, memory_mb = payload["timeout_s"], payload["memory_mb"]
    nproc, float_tol, stop = payload.get("nproc", 16), payload.get("float_tol"), payload.get("stop_on_fail", False)
    statuses: list[str | None] = [None] * len(tests)
    details: list[str] = [""] * len(tests)
    # stdin/stdout tests: one run each
    for i, t in enumerate(tests):
        if "stdin" not in t and "expected" not in t:
            continue
        r = execute(code, stdin=str(t.get("stdin", "")), timeout_s=timeout_s, memory_mb=memory_mb, nproc=nproc)
        if r.status == "ok":
            ok = outputs_match(r.stdout, str(t.get("expected", "")), float_tol)
            statuses[i] = "passed" if ok else "wrong_answer"
        else:
            statuses[i] = r.status
            details[i] = r.reason or r.stderr.strip()[-200:]
        if stop and statuses[i] != "passed":
            break
    # assert tests: one run for all of them
    plan, expected = [], {}
    for i, t in enumerate(tests):
        if "setup" in t:
            plan.append({"mode": "setup", "code": str(t["setup"])})
        elif "assert" in t:
            mode, text, value = split_assert(str(t["assert"]))
            if mode == "value":
                plan.append({"mode": "value", "i": i, "expr": text})
                expected[i] = value
            else:
                plan.append({"mode": "exec", "i": i, "code": text})
    n_assert = sum(1 for p in plan if p["mode"] != "setup")
    if n_assert and not (stop and any(s not in (None, "passed") for s in statuses)):
        r = execute(HARNESS, timeout_s=2 * timeout_s,
                    memory_mb=memory_mb, nproc=nproc, result_fd=True,
                    files={"solution.py": code, "tests.json": json.dumps(plan)})
        seen: set[int] = set()
        for line in r.extra.get("result", b"").decode("utf-8", "replace").splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict):
                continue
            if "setup_error" in msg:
                for p in plan:
                    if p["mode"] != "setup" and p["i"] not in seen:
                        statuses[p["i"]] = "runtime_error"
                        details[p["i"]] = str(msg["setup_error"])[:200]
                        seen.add(p["i"])
                continue
            i = msg.get("i")
            if not isinstance(i, int) or not (0 <= i < len(tests)) or "assert" not in tests[i]:
                continue
            seen.add(i)  # the LAST report for a test wins: the harness reports after the solution ran
            if not msg.get("ok"):
                statuses[i] = "runtime_error" if not str(msg.get("error", "")).startswith("AssertionError") else "wrong_answer"
                details[i] = str(msg.get("error", ""))[:200]
            elif i in expected:
                try:
                    got = decode_value(msg.get("value"))
                    statuses[i] = "passed" if got == expected[i] else "wrong_answer"
                except Exception:  # noqa: BLE001
                    statuses[i] = "wrong_answer"
                    details[i] = "undecodable result"
            else:
                statuses[i] = "passed"
        for p in plan:  # tests that never reported: the run ended early (timeout, crash, exit)
            if p["mode"] != "setup" and p["i"] not in seen:
                statuses[p["i"]] = r.status if r.status != "ok" else "no_result"
                details[p["i"]] = r.reason or r.stderr.strip()[-200:]
    total = sum(1 for t in tests if "stdin" in t or "expected" in t or "assert" in t)
    passed = sum(1 for s in statuses if s == "passed")
    first = next(((s, d) for s, d in zip(statuses, details) if s not in (None, "passed")), None)
    return {"passed": passed, "total": total, "statuses": statuses,
            "first_failure": f"{first[0]}: {first[1]}".rstrip(": ") if first else ""}


class CodeAccuracy:
    """Batched verifier for ``task == 'code'``: one pool task per sample (its tests run serially).

    The assert tests of one sample share one sandbox run of ``2 * test_timeout_s``."""

    def __init__(self, config: RewardConfig):
        opts = config.options.get("code", {})
        self.all_or_nothing = config.code_reward == "all_or_nothing"
        self.test_timeout_s = float(opts.get("test_timeout_s", config.timeout_s))
        self.memory_mb = int(opts.get("memory_mb", 256))
        self.max_tests = int(opts.get("max_tests", 100))
        self.float_tol = opts.get("float_tol")
        self.nproc = int(opts.get("nproc", 16))

    def payload(self, x: RewardInput) -> dict | Verdict:
        if not isinstance(x.response, str):
            return Verdict(0.0, "bad_response_type")
        tests = x.tests or []
        if not isinstance(tests, list) or not all(isinstance(t, dict) for t in tests):
            return Verdict(0.0, "bad_tests: expected a list of dicts")
        n = sum(1 for t in tests if "stdin" in t or "expected" in t or "assert" in t)
        if n == 0:
            return Verdict(0.0, "no_tests")
        if n > self.max_tests:
            return Verdict(0.0, f"too_many_tests ({n} > max_tests={self.max_tests})")
        code = extract_code(x.response)
        if code is None:
            return Verdict(0.0, "no_code")
        prefix = x.meta.get("code_prefix", "") if isinstance(x.meta, dict) else ""
        return {"code": prefix + code, "tests": tests, "timeout_s": self.test_timeout_s,
                "memory_mb": self.memory_mb, "nproc": self.nproc, "float_tol": self.float_tol,
                "stop_on_fail": self.all_or_nothing}

    def task_timeout(self, payload: dict) -> float:
        n = len(payload["tests"])
        return n * (self.test_timeout_s + 1.0) + 2 * self.test_timeout_s + 5.0

    def verdict(self, value: dict) -> Verdict:
        passed, total = value["passed"], value["total"]
        metrics = {"code_tests_passed": float(passed), "code_tests_total": float(total)}
        if passed == total:
            return Verdict(1.0, "ok", metrics)
        score = 0.0 if self.all_or_nothing else passed / total
        kind = value["first_failure"].split(":")[0] or "failed"
        return Verdict(score, f"{kind} ({passed}/{total} passed): {value['first_failure']}"[:300], metrics)

    def __call__(self, inputs: list[RewardInput], ctx) -> list[Verdict]:
        out: list[Verdict | None] = [None] * len(inputs)
        idx, tasks = [], []
        for i, x in enumerate(inputs):
            p = self.payload(x)
            if isinstance(p, Verdict):
                out[i] = p
            else:
                idx.append(i)
                tasks.append(Task("code", p, self.task_timeout(p)))
        if tasks:
            outcomes = ctx.pool.run(tasks)
            ctx.count("verifications", len(tasks))
            for i, o in zip(idx, outcomes):
                if o.ok:
                    out[i] = self.verdict(o.value)
                    for s in o.value["statuses"]:
                        if s is not None:
                            ctx.count(f"code/{s}")
                        if s in ("timeout", "sandbox_error"):
                            ctx.count_failure(s)
                else:
                    out[i] = Verdict(0.0, o.reason)
                    ctx.count_failure(o.reason)
        return out  # type: ignore[return-value]


def humaneval_tests(test_src: str, entry_point: str) -> list[dict]:
    """Turn a HumanEval-style ``check(candidate)`` test module into test items.

    Module-level code other than ``check`` becomes one ``setup`` item. If the body of ``check`` is
    only ``assert`` statements, each becomes its own assert test with ``candidate`` renamed to
    ``entry_point`` (so ``assert candidate(x) == 3`` is scored with the expected value hidden);
    otherwise the whole check is one test ``check(entry_point)``.

    >>> humaneval_tests("def check(candidate):\\n    assert candidate(1) == 2\\n", "inc")
    [{'assert': 'assert inc(1) == 2'}]
    """
    tree = ast.parse(test_src)
    setup = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "check")]
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    items: list[dict] = [{"setup": ast.unparse(ast.Module(body=setup, type_ignores=[]))}] if setup else []
    if len(checks) != 1:
        raise ValueError("expected exactly one `def check(candidate)`")
    check = checks[0]
    arg = check.args.args[0].arg if check.args.args else "candidate"
    if all(isinstance(s, ast.Assert) for s in check.body):
        class Rename(ast.NodeTransformer):
            def visit_Name(self, node):
                return ast.copy_location(ast.Name(id=entry_point, ctx=node.ctx), node) if node.id == arg else node
        for stmt in check.body:
            items.append({"assert": ast.unparse(Rename().visit(stmt))})
    else:
        items.append({"assert": ast.unparse(check) + f"\ncheck({entry_point})"})
    return items
