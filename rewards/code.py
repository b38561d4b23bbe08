"""Code accuracy: run model-written Python against tests in the sandbox (rewards.sandbox).

Test items (``RewardInput.tests``), both styles may be mixed:

- ``{"stdin": "...", "expected": "..."}`` — a stdin/stdout program (Codeforces, APPS, LiveCodeBench).
  One sandbox run per test; stdout is compared in the caller with ``expected`` token by token
  (whitespace-insensitive; numbers with a decimal point within ``float_tol`` if that option is set).
- ``{"assert": "assert f(1) == 2"}`` — a function checked by asserts (HumanEval, MBPP). All assert
  tests of a sample run in ONE sandbox process after the solution has been executed.
  Each assert is split in the caller (``split_assert``): only the sub-expressions that need the
  solution (``add(1, 2)``, ``f(x).real``) enter the sandbox; their values come back encoded (exact
  built-in types only) and the rest of the assert (``== 3``, ``abs(... - 1.5) < 1e-6``,
  ``math.isclose``, ``sorted``, ``and``/``or``) is evaluated by the caller. The harness that
  decides pass/fail is therefore outside the sandbox: expected values are never visible to the
  program under test, and the program cannot forge a pass by patching builtins, defining a
  universal ``__eq__`` or writing fake reports. Only an assert whose solution call depends on a
  variable of the test (``all(f(x) == x for x in xs)``, a lambda) or that holds several
  statements runs as is inside the sandbox; such checks are visible and forgeable, are counted
  (``code/in_sandbox_checks``), and ``in_sandbox_checks: refuse`` fails them instead.
- ``{"setup": "..."}`` — code run before the assert tests (imports, helpers); not a test.

The exit code proves nothing: a stdin test passes only if stdout matches, an assert test only if
its result line (written on a private pipe) says so. Score: fraction of tests passed, or 1/0 with
``code_reward='all_or_nothing'`` (which stops at the first failing test).

Options (``config.options["code"]``): ``test_timeout_s`` (per sandbox run, default
``config.timeout_s``), ``memory_mb`` (256), ``max_tests`` (100), ``float_tol`` (None), ``nproc`` (16),
``in_sandbox_checks`` (``allow`` | ``refuse``).
"""
from __future__ import annotations

import ast
import builtins
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
            _vs = []
            for _e in _t["exprs"]:
                try:
                    _vs.append({"v": _enc(eval(compile(_e, "test_%d.py" % _i, "eval"), _ns))})
                except SystemExit:
                    raise
                except BaseException as e:
                    _vs.append({"e": _type(e).__name__ + ": " + str(e)[:200]})
            _report({"i": _t["i"], "ok": True, "values": _vs})
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


SAFE_BUILTINS = frozenset("""abs all any ascii bin bool bytes chr complex dict divmod enumerate float
frozenset hex int isinstance issubclass len list max min oct ord pow range repr reversed round set
slice sorted str sum tuple type zip None True False""".split())
"""Names a test may use in the part of its check that runs in the caller (with the real builtins)."""
_HOST_MODULES = {"math": math}
_HOST_BUILTINS = {name: getattr(builtins, name) for name in SAFE_BUILTINS if hasattr(builtins, name)}
_SCOPES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.NamedExpr)


class _Unsplittable(Exception):
    pass


def _free_names(node: ast.AST) -> set[str]:
    loads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    bound = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments)
              for a in n.posonlyargs + n.args + n.kwonlyargs + [x for x in (n.vararg, n.kwarg) if x]}
    return loads - bound - SAFE_BUILTINS - set(_HOST_MODULES)


def _host_callee(func: ast.AST) -> bool:
    """A callee whose call the caller evaluates itself: a safe builtin or ``math.<name>``."""
    if isinstance(func, ast.Name):
        return func.id in SAFE_BUILTINS
    return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id in _HOST_MODULES and not func.attr.startswith("_"))


class _Lift(ast.NodeTransformer):
    """Replace each smallest sub-expression that needs the solution with ``_aha_v(k)``.

    Operators, comparisons, literals, safe builtins and ``math`` stay in the caller's check;
    what is lifted runs in the sandbox and comes back as a plain value."""

    def __init__(self):
        self.exprs: list[str] = []

    def visit(self, node):
        if not isinstance(node, ast.expr) or not _free_names(node):
            return node
        if isinstance(node, _SCOPES):
            raise _Unsplittable()  # the solution's value would depend on a caller-side variable
        if isinstance(node, (ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.IfExp, ast.Tuple,
                             ast.List, ast.Set, ast.Dict, ast.Starred, ast.JoinedStr,
                             ast.FormattedValue)) or (isinstance(node, ast.Call) and _host_callee(node.func)):
            return self.generic_visit(node)
        self.exprs.append(ast.unparse(node))
        call = ast.Call(ast.Name("_aha_v", ast.Load()), [ast.Constant(len(self.exprs) - 1)], [])
        return ast.copy_location(call, node)

    def generic_visit(self, node):
        for field, old in ast.iter_fields(node):
            if isinstance(old, list):
                old[:] = [self.visit(x) if isinstance(x, ast.expr) else self._kw(x) for x in old]
            elif isinstance(old, ast.expr):
                setattr(node, field, self.visit(old))
        return node

    def _kw(self, x):
        if isinstance(x, ast.keyword):
            x.value = self.visit(x.value)
        return x


def split_assert(code: str):
    """``('value', exprs, check)`` if the assert can be checked outside the sandbox, else
    ``('exec', code, None)``.

    ``exprs`` are the sub-expressions that need the solution (they run in the sandbox and come
    back as plain values); ``check`` is the rest of the assert, an expression over ``_aha_v(k)``
    that the caller evaluates, so expected values, tolerances and the comparison itself never
    enter the sandbox. An assert needs the sandbox for its whole check only when the solution's
    value depends on a variable of the test (a comprehension or lambda over a solution call).

    >>> split_assert("assert add(1, 2) == 3")
    ('value', ['add(1, 2)'], '_aha_v(0) == 3')
    >>> split_assert("assert abs(f(2) - 1.5) < 1e-6")
    ('value', ['f(2)'], 'abs(_aha_v(0) - 1.5) < 1e-06')
    >>> split_assert("assert all(f(x) == x for x in range(3))")[0]
    'exec'
    """
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return "exec", code, None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return "exec", code, None
    test = tree.body[0].test
    lift = _Lift()
    try:
        check = lift.visit(test)
    except _Unsplittable:
        return "exec", code, None
    return "value", lift.exprs, ast.unparse(check)


def host_check(check: str, values: list) -> bool:
    """Evaluate a split assert's check in the caller. ``values[k]`` is the decoded value of the
    k-th lifted expression, or an exception it raised in the sandbox (raised here only if the
    check uses it, so ``x is None or x[0] == 1`` short-circuits as it would in Python)."""
    def v(k: int):
        x = values[k]
        if isinstance(x, BaseException):
            raise x
        return x
    env = {"__builtins__": _HOST_BUILTINS, **_HOST_MODULES, "_aha_v": v}
    return bool(eval(compile(check, "<check>", "eval"), env))  # noqa: S307 - the dataset's test text


class SandboxError(Exception):
    """An exception the program under test raised inside the sandbox (type name and message)."""


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
    plan, checks, in_sandbox_checks = [], {}, 0
    in_sandbox = payload.get("in_sandbox_checks", "allow")
    for i, t in enumerate(tests):
        if "setup" in t:
            plan.append({"mode": "setup", "code": str(t["setup"])})
        elif "assert" in t:
            mode, text, check = split_assert(str(t["assert"]))
            if mode == "value":
                plan.append({"mode": "value", "i": i, "exprs": text})
                checks[i] = (check, len(text))
            elif in_sandbox == "refuse":
                statuses[i] = "refused_in_sandbox_check"
                details[i] = "this assert can only be checked inside the sandbox (code.in_sandbox_checks: refuse)"
            else:
                plan.append({"mode": "exec", "i": i, "code": text})
                in_sandbox_checks += 1
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
            elif i in checks:
                statuses[i], details[i] = _judge(checks[i], msg.get("values"))
            else:
                statuses[i] = "passed"
        for p in plan:  # tests that never reported: the run ended early (timeout, crash, exit)
            if p["mode"] != "setup" and p["i"] not in seen:
                statuses[p["i"]] = r.status if r.status != "ok" else "no_result"
                details[p["i"]] = r.reason or r.stderr.strip()[-200:]
    total = sum(1 for t in tests if "stdin" in t or "expected" in t or "assert" in t)
    passed = sum(1 for s in statuses if s == "passed")
    first = next(((s, d) for s, d in zip(statuses, details) if s not in (None, "passed")), None)
    return {"passed": passed, "total": total, "statuses": statuses, "in_sandbox_checks": in_sandbox_checks,
            "first_failure": f"{first[0]}: {first[1]}".rstrip(": ") if first else ""}


def _judge(check: tuple[str, int], reported) -> tuple[str, str]:
    """(status, detail) of a split assert from the values the sandbox reported for it."""
    check, n = check
    try:
        if len(reported) != n:
            return "wrong_answer", f"{len(reported)} values reported for {n} expressions"
        values = [decode_value(x["v"]) if "v" in x else SandboxError(str(x["e"])[:200]) for x in reported]
    except Exception:  # noqa: BLE001 - whatever came back that is not an encoded value
        return "wrong_answer", "undecodable result"
    try:
        return ("passed", "") if host_check(check, values) else ("wrong_answer", "AssertionError")
    except SandboxError as e:
        return "runtime_error", str(e)
    except Exception as e:  # noqa: BLE001 - the check failed on the values (e.g. a TypeError)
        return "wrong_answer", f"{type(e).__name__}: {str(e)[:200]}"


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
        self.in_sandbox_checks = opts.get("in_sandbox_checks", "allow")  # checked by RewardConfig.validate

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
                "stop_on_fail": self.all_or_nothing, "in_sandbox_checks": self.in_sandbox_checks}

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
            outcomes = ctx.code_pool.run(tasks)
            ctx.count("verifications", len(tasks))
            for i, o in zip(idx, outcomes):
                if o.ok:
                    out[i] = self.verdict(o.value)
                    ctx.count("code/in_sandbox_checks", o.value.get("in_sandbox_checks", 0))
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
