"""rewards.sandbox.execute: statuses, limits, isolation facts (needs bwrap; skips with the reason)."""
import os
import socket
import threading

import pytest

from rewards.sandbox import STATUSES, execute

from .conftest import SECRET, sandbox_leftovers

pytestmark = pytest.mark.usefixtures("needs_sandbox")


@pytest.mark.parametrize("src,stdin,status", [
    ("print(input()[::-1])", "abc", "ok"),
    ("raise ValueError('boom')", "", "runtime_error"),
    ("import sys; sys.exit(3)", "", "runtime_error"),
    ("while True: pass", "", "timeout"),
    ("x = bytearray(4 << 30)", "", "memory_limit"),
    ("x = []\nwhile True: x.append(bytearray(1 << 20))", "", "memory_limit"),
    ("while True: print('y' * 4096)", "", "output_limit"),
    ("import sys\nwhile True: sys.stderr.write('e' * 4096)", "", "output_limit"),
    ("import ctypes; ctypes.string_at(0)", "", "runtime_error"),  # a real segfault kills even pid 1
])
def test_statuses(src, stdin, status):
    r = execute(src, stdin=stdin, timeout_s=1.0, memory_mb=128)
    assert r.status == status, r
    assert r.status in STATUSES
    if status == "ok":
        assert r.stdout == "cba\n" and r.exit_code == 0
    if status == "timeout":
        assert r.wall_s < 3 and r.exit_code is None
    assert len(r.stdout) <= 1 << 20 and len(r.stderr) <= 64 << 10
    assert not sandbox_leftovers()


def test_big_stdin_and_unicode():
    data = "héllo\n" * 200_000  # bigger than a pipe buffer
    r = execute("import sys; d = sys.stdin.read(); print(len(d), d[:5])", stdin=data, timeout_s=3)
    assert r.status == "ok" and r.stdout == f"{len(data)} héllo\n"


def test_sees_nothing_of_the_host():
    src = r"""
import os
print(sorted(os.listdir('/')))
print(len([p for p in os.listdir('/proc') if p.isdigit()]))
print(open('/proc/1/environ', 'rb').read())
print(sorted(os.environ))
print(os.getuid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])
"""
    r = execute(src, timeout_s=2)
    lines = r.stdout.splitlines()
    assert lines[0] == str(sorted(["bin", "dev", "lib", "lib64", "proc", "sandbox", "sbin", "tmp", "usr"]))
    assert int(lines[1]) == 1                       # the program only (pid 1, no bwrap init)
    env = {kv.split(b"=")[0] for kv in eval(lines[2]).split(b"\0") if kv}
    assert env <= {b"PATH", b"HOME", b"LANG", b"PWD", b"PYTHONDONTWRITEBYTECODE", b"PYTHONIOENCODING"}, env
    assert SECRET not in r.stdout
    uid, capeff = lines[4].split()
    assert int(uid) != 0 and int(capeff, 16) == 0   # unprivileged, no capabilities


def test_no_network_even_to_host_loopback():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.1)
    port = srv.getsockname()[1]
    got = []

    def accept():
        try:
            got.append(srv.accept())
        except OSError:
            pass
    th = threading.Thread(target=accept)
    th.start()
    src = f"import socket\ns = socket.socket(); s.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('CONNECTED')"
    r = execute(src, timeout_s=2)
    th.join()
    srv.close()
    assert "CONNECTED" not in r.stdout and r.status == "runtime_error" and not got


def test_nothing_written_to_host(tmp_path):
    marker = tmp_path / "escape"
    src = f"""
for p in ['/tmp/aha_escape_marker', {str(marker)!r}, '/usr/aha_marker', '/aha_marker', '/sandbox/x']:
    try:
        open(p, 'w').write('x')
    except OSError:
        pass
"""
    r = execute(src, timeout_s=2)
    assert r.status == "ok"
    assert not marker.exists() and not os.path.exists("/tmp/aha_escape_marker")
    assert not os.path.exists("/usr/aha_marker") and not os.path.exists("/aha_marker")



def test_seccomp_filter_keeps_ordinary_programs_working():
    from rewards.seccomp import filter_bpf, seccomp_available
    assert seccomp_available() == (True, "ok") and len(filter_bpf()) > 100
    prog = ("import os, socket, subprocess, threading\n"
            "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
            "a, b = socket.socketpair(); a.send(b'x'); assert b.recv(1) == b'x'\n"
            "print(subprocess.run(['echo', 'sub'], capture_output=True, text=True).stdout.strip())\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    os._exit(7)\n"
            "print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")
    r = execute(prog, timeout_s=10)
    assert (r.status, r.stdout) == ("ok", "sub\n7\n"), r



def test_seccomp_denials_are_clear_errors_not_kills():
    r = execute("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                "print(libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno())", timeout_s=5)
    assert (r.status, r.stdout) == ("ok", "-1 1\n")  # EPERM
