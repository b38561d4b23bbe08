"""Isolated math workers (rewards.sandbox.worker_command, used by WorkerPool(isolated=True)).

A math worker parses model output with sympy / latex2sympy (sympy's parse_expr evaluates Python).
Each probe below runs as the worker would after a parser bug handed the attacker the interpreter:
the same command, binds, filter and privilege drop the pool uses, with the probe as the program.
"""
import json
import os
import subprocess
import sys

import pytest

from rewards.pool import _PKG_PARENT, _THREADS, WorkerPool, Task, _isolated_binds
from rewards.sandbox import worker_command

from .conftest import SECRET, sandbox_ok

pytestmark = pytest.mark.skipif(not sandbox_ok()[0], reason=f"no sandbox here: {sandbox_ok()[1]}")

PROBE = r'''
import ctypes, json, os, socket, sys
import sympy, math_verify            # what a worker imports before it drops its privileges
if "--drop-to" in sys.argv:
    from rewards.sandbox import drop_privileges
    drop_privileges(int(sys.argv[sys.argv.index("--drop-to") + 1]))
from math_verify import parse, verify
out = {"uid": os.getuid(), "verify": bool(verify(parse("$1/2$"), parse("$0.5$")))}
status = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
out["caps"] = int(status["CapEff"], 16) | int(status["CapPrm"], 16)
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["env_has_secret"] = SECRET in json.dumps(dict(os.environ))
out["processes"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
def can(f):
    try:
        f()
        return True
    except Exception:
        return False
out["read"] = [p for p in ("/etc/passwd", "/etc/shadow", "/root/.bashrc", os.path.join(PKG, "setup.py"),
                           os.path.join(PKG, "README.md")) if can(lambda p=p: open(p).read())]
out["write"] = [p for p in (os.path.join(PKG, "rewards", "pwned.py"), os.path.join(sys.prefix, "pwned"), "/usr/pwned",
                            "/pwned") if can(lambda p=p: open(p, "w").write("x"))]
out["tmp_write"] = can(lambda: open("/tmp/scratch", "w").write("x"))
out["inet"] = can(lambda: socket.create_connection(("1.1.1.1", 80), timeout=0.5))
out["inet_socket"] = can(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
libc = ctypes.CDLL(None, use_errno=True)
out["unshare_user"] = libc.unshare(0x10000000) == 0
out["ptrace_parent"] = libc.ptrace(16, os.getppid(), 0, 0) == 0
out["setuid_root"] = can(lambda: os.setuid(0))
n = 0
kids = []
for _ in range(64):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        import time
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
out["forks"] = len(kids)
for k in kids:
    os.kill(k, 9)
print(json.dumps(out))
'''


def run_probe():
    env = {"PYTHONPATH": _PKG_PARENT, **_THREADS}
    argv = [sys.executable, "-c", f"SECRET = {SECRET!r}\nPKG = {_PKG_PARENT!r}\n" + PROBE]
    cmd, fds, kw = worker_command(argv, _isolated_binds(), env, nproc=16)
    kw.pop("uid")
    os.environ["AHA_HOSTILE_SECRET"] = SECRET  # in the caller's environment, never in the worker's
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, pass_fds=fds, **kw)
    finally:
        for fd in fds:
            os.close(fd)
        os.environ.pop("AHA_HOSTILE_SECRET", None)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_hijacked_math_worker_is_contained():
    out = run_probe()
    assert out["verify"] is True                       # the real math stack works in there
    if os.geteuid() == 0:
        assert out["uid"] != 0 and out["caps"] == 0    # dropped to a fresh uid, no capabilities
    assert out["no_new_privs"] == "1" and not out["setuid_root"]
    assert out["processes"] == [1] or out["processes"][0] == 1 and len(out["processes"]) == 1
    assert not out["env_has_secret"]
    assert out["read"] == []                           # no /etc, /root, nor the project beyond rewards/
    assert out["write"] == [] and out["tmp_write"]     # everything read-only but a private /tmp
    assert not out["inet"] and not out["inet_socket"]  # no network, no inet sockets at all
    assert not out["unshare_user"] and not out["ptrace_parent"]
    if os.geteuid() == 0:
        assert out["forks"] < 16                       # nproc counts the fresh uid's processes only


def test_isolated_pool_scores_and_costs_nothing_per_check():
    p = WorkerPool(1, isolated=True)
    try:
        out = p.run([Task("math", (str(i), f"\\frac{{{2 * i}}}{{2}}"), 10.0) for i in range(20)])
        assert [o.value for o in out] == [1.0] * 20
        assert p._workers[0].uid is not None or os.geteuid() != 0
    finally:
        p.close()
    from rewards.sandbox import _uid_pids
    assert not any(s not in ("Z", "X") for _, s in _uid_pids(p._workers[0].uid if p._workers else -1))


def test_bad_isolation_config_is_refused():
    from rewards import RewardConfig
    with pytest.raises(ValueError, match="reward.isolation"):
        RewardConfig(isolation="docker").validate()
    with pytest.raises(ValueError, match="worker_memory_mb"):
        RewardConfig(worker_memory_mb=64).validate()
