"""Hostile programs: each tries one escape or denial of service through the full scorer.

Each must score 0, leave no process behind, keep the scorer up, and a normal job submitted in the
same batch must still pass. Run with 3 s timeouts so the suite stays short.
"""
import os

import pytest

from rewards import RewardInput

from .conftest import SECRET, sandbox_leftovers

HOST_FILE = "/tmp/aha_hostile_canary.txt"
EXPECTED_TOKEN = "EXPECTED_9c1b77_TOKEN"

HOSTILE = {
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "fork_bomb_sleepers": "import os, time\nfor _ in range(10000):\n    try:\n        if os.fork() == 0:\n            time.sleep(1000)\n    except OSError:\n        pass\ntime.sleep(1000)",
    "thread_bomb": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(1000,)).start()",
    "memory_bomb": "x = bytearray(8 << 30)\nprint(1)",
    "memory_growth": "x = []\nwhile True:\n    x.append(bytearray(1 << 20))",
    "endless_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(10**6)",
    "ignore_sigterm": "import signal, time\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)",
    "stop_self": "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)",
    "endless_output": "while True:\n    print('x' * 10000)",
    "endless_stderr": "import sys\nwhile True:\n    sys.stderr.write('e' * 10000)",
    "close_pipes_and_spin": "import os\nos.close(1); os.close(2)\nwhile True:\n    pass",
    "network_connect": "import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=0.5)\nprint(3)",
    "dns_lookup": "import socket\nprint(socket.gethostbyname('pypi.org'))\nprint(3)",
    "read_parent_environ": "import os, glob\nfor p in glob.glob('/proc/*/environ'):\n    try:\n        print(open(p, 'rb').read())\n    except OSError:\n        pass\nprint(dict(os.environ))",
    "list_host_processes": "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\nprint(pids)\nassert len(pids) > 5\nprint(3)",
    "read_host_files": f"for p in ['/etc/passwd', '/etc/shadow', '/root/.bashrc', {HOST_FILE!r}, '/work', '/home']:\n    try:\n        print(open(p).read())\n    except OSError:\n        pass\nprint(3 if False else 4)",
    "write_outside": f"for p in ['/usr/bin/aha_pwned', '/etc/aha_pwned', {HOST_FILE!r}, '/sandbox/main.py', '/aha_pwned']:\n    try:\n        open(p, 'w').write('pwned')\n        print('WROTE', p)\n    except OSError:\n        pass",
    "delete_outside": f"import os, shutil\nfor p in ['/usr/bin/python3', {HOST_FILE!r}, '/sandbox/main.py']:\n    try:\n        os.remove(p)\n    except OSError:\n        pass\nshutil.rmtree('/usr', ignore_errors=True)",
    "kill_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\nprint('still here')",
    "kill_everything": "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\nfor pid in range(2, 5000):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nprint('still here')",
    "daemon_left_behind": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1000)\n    os._exit(0)\nprint(4)",
    "read_expected_output": f"import os, glob\nfound = ''\nfor p in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ') + glob.glob('/sandbox/*') + glob.glob('/proc/self/fd/*'):\n    try:\n        d = open(p, 'rb').read().decode(errors='ignore')\n    except OSError:\n        continue\n    i = d.find('EXPECTED_')\n    if i >= 0:\n        found = d[i:i + 21]\nprint(found or 'nothing')",
    "gain_privileges": "import os\nos.setuid(0)\nprint(3)",
    "capabilities_check": "caps = open('/proc/self/status').read().split('CapEff:')[1].split()[0]\nprint(3 if int(caps, 16) else 4)",
    "mount_tmpfs": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nr = libc.mount(b'none', b'/usr', b'tmpfs', 0, None)\nprint(3 if r == 0 else 4)",
    "tiocsti_terminal": "import fcntl, termios\nfd = open('/dev/tty', 'wb')\nfcntl.ioctl(fd, termios.TIOCSTI, b'x')\nprint(3)",
    "fill_tmp": "i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'wb').write(b'a' * (4 << 20)); i += 1",
    "fill_dev_shm": "open('/dev/shm/x', 'wb').write(b'a' * (64 << 20))",
    "huge_file": "open('/tmp/big', 'wb').write(b'a' * (256 << 20))",
    "open_files": "fs = [open('/dev/null') for _ in range(100000)]",
    "deep_recursion_segfault": "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1) + 1\nf(0)",
    "exit_zero_early": "import os\nos._exit(0)",
    "raise_systemexit_in_atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(0)",
    "nice_and_rlimit_raise": "import os, resource\nos.nice(-20)\nresource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6))\nprint(3)",
    # kernel attack surface, closed by the seccomp filter (rewards/seccomp.py) and --disable-userns
    "unshare_user_namespace": "import subprocess\nr = subprocess.run(['unshare', '-r', 'true'])\nprint(3 if r.returncode == 0 else 4)",
    "unshare_syscall_net": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(3 if libc.unshare(0x40000000) == 0 else 4)",
    "unshare_syscall_mount_ns": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(3 if libc.unshare(0x00020000) == 0 else 4)",
    "clone_new_user_ns": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\npid = libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0)\nif pid == 0:\n    os._exit(0)\nprint(3 if pid > 0 else 4)",
    "ptrace_parent": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(3 if libc.ptrace(16, os.getppid(), 0, 0) == 0 else 4)",
    "ptrace_sibling": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nimport time\na = os.fork()\nif a == 0:\n    time.sleep(5)\n    os._exit(0)\nb = os.fork()\nif b == 0:\n    os._exit(0 if libc.ptrace(16, a, 0, 0) == 0 else 1)\n_, st = os.waitpid(b, 0)\nos.kill(a, 9)\nprint(3 if os.waitstatus_to_exitcode(st) == 0 else 4)",
    "process_vm_readv_parent": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nbuf = ctypes.create_string_buffer(8)\nclass IOV(ctypes.Structure):\n    _fields_ = [('b', ctypes.c_void_p), ('n', ctypes.c_size_t)]\nl, r = IOV(ctypes.addressof(buf), 8), IOV(0x400000, 8)\nn = libc.process_vm_readv(os.getppid(), ctypes.byref(l), 1, ctypes.byref(r), 1, 0)\nprint(3 if ctypes.get_errno() != 1 else 4)",
    "raw_socket": "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)\nprint(3)",
    "netlink_socket": "import socket\ns = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\nprint(3)",
    "packet_socket": "import socket\ns = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)\nprint(3)",
    "io_uring_setup": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nparams = ctypes.create_string_buffer(120)\nprint(3 if libc.syscall(425, 8, params) >= 0 else 4)",
    "bpf_map_create": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nattr = (ctypes.c_uint32 * 6)(2, 4, 4, 1, 0, 0)\nprint(3 if libc.syscall(321, 0, attr, 24) >= 0 else 4)",
    "keyring_access": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nr1 = libc.syscall(250, 0, -3, 1)\nr2 = libc.syscall(248, b'user', b'aha', b'x', 1, -3)\nprint(3 if r1 >= 0 or r2 >= 0 else 4)",
    "personality_no_aslr": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.personality.argtypes = [ctypes.c_ulong]\nlibc.personality(0x0040000)\nprint(3 if libc.personality(0xffffffff) & 0x0040000 else 4)",
    "perf_event_open": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nattr = ctypes.create_string_buffer(128)\nctypes.memmove(attr, (ctypes.c_uint32 * 2)(1, 128), 8)\nprint(3 if libc.syscall(298, attr, 0, -1, -1, 0) >= 0 else 4)",
    "userfaultfd": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(3 if libc.syscall(323, 0) >= 0 else 4)",
    "setuid_binaries": "import os, stat, subprocess\nsuid = [os.path.join(r, f) for r, _, fs in os.walk('/usr') for f in fs\n        if os.path.isfile(os.path.join(r, f)) and os.stat(os.path.join(r, f)).st_mode & stat.S_ISUID]\nnnp = open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0]\nok = False\nif os.path.exists('/usr/bin/mount'):\n    ok = subprocess.run(['/usr/bin/mount', '-t', 'tmpfs', 'none', '/tmp'], capture_output=True).returncode == 0\nprint(3 if ok or (suid and nnp == '0') else 4)",
    # nothing of the harness shares the sandbox: no other process to write through /proc/<pid>/mem
    "proc_mem_write_others": "import os\nme = os.getpid()\nwrote = []\nfor p in os.listdir('/proc'):\n    if not p.isdigit() or int(p) == me:\n        continue\n    try:\n        rw = [l for l in open(f'/proc/{p}/maps') if l.split()[1].startswith('rw')]\n        addr = int(rw[0].split('-')[0], 16)\n        with open(f'/proc/{p}/mem', 'r+b', buffering=0) as f:\n            f.seek(addr)\n            b = f.read(1)\n            f.seek(addr)\n            f.write(b)\n        wrote.append(p)\n    except (OSError, IndexError):\n        pass\nprint(3 if wrote else 4)",
    "signal_sandbox_init": "import os, signal\nhit = 0\nfor pid in range(1, 64):\n    if pid != os.getpid():\n        try:\n            os.kill(pid, signal.SIGSTOP)\n            hit += 1\n        except OSError:\n            pass\nprint(3 if hit else 4)",
    "i386_syscall_abi": "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nimport mmap\ncode = bytes([0xb8, 0x14, 0, 0, 0, 0xcd, 0x80, 0xc3])  # mov eax, 20 (getpid); int 0x80; ret\nm = mmap.mmap(-1, 4096, prot=7)\nm.write(code)\nf = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\nprint(3 if f() > 0 else 4)",
}

# what a normal job looks like: reads two ints, prints their sum
NORMAL = RewardInput(response="```python\na, b = map(int, input().split())\nprint(a + b)\n```", task="code",
                     tests=[{"stdin": "1 2", "expected": "3"}, {"stdin": "40 2", "expected": "42"}])


@pytest.fixture(scope="module", autouse=True)
def canary():
    with open(HOST_FILE, "w") as f:
        f.write("canary")
    yield
    os.remove(HOST_FILE)


def test_there_are_at_least_25_hostile_programs():
    assert len(HOSTILE) >= 35


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(code_scorer, name):
    # a program prints 3 (the expected answer) only if its attack worked; kill attacks print nothing
    # useful either way and are judged by the scorer surviving and the normal job passing
    hostile = RewardInput(response=f"```python\n{HOSTILE[name]}\n```", task="code",
                          tests=[{"stdin": "", "expected": "3" if name != "read_expected_output" else EXPECTED_TOKEN}])
    before = code_scorer.stats()
    r_hostile, r_normal = code_scorer.score_batch([hostile, NORMAL])
    assert r_hostile.score == 0.0, (name, r_hostile)
    assert r_hostile.reason != "ok" and r_hostile.reason, r_hostile
    assert r_normal.score == 1.0 and r_normal.reason == "ok", (name, r_normal)
    after = code_scorer.stats()
    assert after["samples"] - before["samples"] == 2
    # containment: host files intact, nothing left running, the scorer still scores
    assert open(HOST_FILE).read() == "canary"
    for p in ("/usr/bin/aha_pwned", "/etc/aha_pwned", "/aha_pwned"):
        assert not os.path.exists(p)
    assert os.path.exists("/usr/bin/python3")
    assert not sandbox_leftovers(), name
    assert code_scorer.score_batch([NORMAL])[0].score == 1.0


def test_secret_environment_never_reaches_output(code_scorer):
    prog = HOSTILE["read_parent_environ"]
    r = code_scorer.score_batch([RewardInput(response=f"```python\n{prog}\n```", task="code",
                                             tests=[{"stdin": "", "expected": SECRET}])])[0]
    assert r.score == 0.0 and r.reason.startswith("wrong_answer")


def test_stats_after_hostile_suite(code_scorer):
    s = code_scorer.stats()
    assert s["verifications"] > 0 and s["worker_starts"] >= 2
