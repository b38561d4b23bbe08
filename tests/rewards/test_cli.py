"""aha sandbox CLI: sandbox_main(argv) and python -m rewards.cli."""
import json
import os
import subprocess
import sys

import pytest

from rewards.cli import sandbox_main

pytestmark = pytest.mark.usefixtures("needs_sandbox")


def test_sandbox_main_single_and_tests(tmp_path, capsys):
    prog = tmp_path / "double.py"
    prog.write_text("print(int(input()) * 2)\n")
    (tmp_path / "in.txt").write_text("21\n")
    assert sandbox_main([str(prog), "--stdin", str(tmp_path / "in.txt"), "--timeout", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "ok" and out["stdout"] == "42\n" and out["exit_code"] == 0
    assert set(out) >= {"status", "stdout", "stderr", "exit_code", "wall_s"}
    (tmp_path / "t.json").write_text(json.dumps([{"stdin": "1", "expected": "2"}, {"stdin": "2", "expected": "5"}]))
    assert sandbox_main([str(prog), "--tests", str(tmp_path / "t.json")]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["passed"], out["total"], out["tests"]) == (1, 2, ["passed", "wrong_answer"])


def test_sandbox_main_timeout_and_usage(tmp_path, capsys):
    prog = tmp_path / "spin.py"
    prog.write_text("while True: pass\n")
    assert sandbox_main([str(prog), "--timeout", "0.5"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "timeout"
    assert sandbox_main([str(tmp_path / "missing.py")]) == 2
    assert json.loads(capsys.readouterr().out)["status"] == "usage_error"


def test_python_dash_m(tmp_path):
    prog = tmp_path / "hello.py"
    prog.write_text("print('hi')\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root)
    p = subprocess.run([sys.executable, "-m", "rewards.cli", "sandbox", str(prog)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["stdout"] == "hi\n"
