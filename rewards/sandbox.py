"""Run untrusted (model-written) Python in a bubblewrap sandbox: ``execute(source, stdin, ...)``.

Built for a plain Linux machine with no Docker where the caller may be root (our CI and reward
workers). Needs the ``bwrap`` binary (Debian: ``apt-get install -y bubblewrap``) and unprivileged
user namespaces (the Debian default).

What is covered
---------------
- Privileges: when the caller is root, bwrap itself is started as a fresh unprivileged uid/gid
  (a random one per run, in ``UID_RANGE``, with no supplementary groups), so the program has no
  capabilities anywhere, even inside its namespaces (as root, bwrap would keep them).
- Namespaces: new user, pid, mount, network (loopback only, down), ipc, uts and cgroup
  namespaces; ``--new-session`` (no TIOCSTI into the caller's terminal); ``--die-with-parent``.
- Nothing of ours inside: the program is pid 1 of its pid namespace (``--as-pid-1``, no bwrap
  reaper init), so the only processes in the sandbox are the program and its own children; no
  harness, no init whose memory (``/proc/1/mem``) or exit status it could tamper with. The test
  harness of rewards.code runs in the caller, outside. Pid-1 semantics apply: signals the program
  sends itself with a default action (``os.kill(os.getpid(), SIGTERM)``) are ignored (real faults,
  SIGKILL from outside and rlimit kills still end it), and its orphans are not reaped until it
  exits (they count against ``nproc``).
- Filesystem: the root is an empty tmpfs remounted read-only; ``/usr`` (and the ``/bin``, ``/lib``,
  ``/lib64`` links) read-only; a fresh ``/proc`` for the new pid namespace; a minimal ``/dev``
  (read-only, its ``/dev/shm`` a small sized tmpfs); a private ``/tmp`` tmpfs of ``tmp_mb``
  (the working directory). Nothing else of the host is visible: no ``/etc``, ``/home``, ``/root``,
  ``/work``, no other process (own pid namespace), no host sockets.
- Environment: bwrap is launched with an EMPTY environment (``--clearenv`` alone still leaves the
  caller's environment readable at ``/proc/1/environ``); the program sees only ``PATH``, ``HOME``,
  ``LANG`` and ``PYTHON*`` variables set here.
- Limits (setrlimit before exec, inherited by every process in the sandbox): address space
  ``memory_mb``, CPU seconds, processes (``nproc``, per uid, and the uid is fresh per run),
  file size, open files, no core dumps; tmpfs sizes are explicit because tmpfs pages are not
  counted by RLIMIT_AS.
- Output: stdout and stderr are read by the caller and capped (``max_output_bytes``); past the
  cap the run is killed with status ``output_limit``.
- Time: a wall-clock timeout SIGKILLs bwrap; its init (pid 1 of the sandbox) dies with it and the
  kernel kills everything else in the pid namespace. Before returning, ``execute`` waits until no
  process of the run's uid is left (a killed fork bomb takes a moment to disappear), so a run
  leaves no processes behind: not a daemon, not a zombie (reaped if we are a subreaper, as pool
  workers are).
- System calls: a seccomp filter (rewards.seccomp, libseccomp through pyseccomp) makes ptrace,
  process_vm_*, mount / unshare / setns / clone with namespace flags, bpf, perf_event_open,
  userfaultfd, io_uring, keyrings, module loading, kexec, reboot, personality changes and
  non-AF_UNIX sockets fail with EPERM; ``--disable-userns`` stops new user namespaces inside.
- Status is decided by the caller from what it observed (its own kill, bwrap's JSON status, the
  exit code, a MemoryError trace), never from what the program prints.

What is not covered
-------------------
- Kernel exploits: the sandbox shares the host kernel (no VM). The seccomp filter closes the
  usual doors (above), but a kernel bug reachable through an allowed syscall can still break out.
- For assert tests rewards.code evaluates the solution's sub-expressions in the program's own
  interpreter (that is what calling it means); the program can see those expressions (not the
  expected values, which stay in the caller). Asserts rewards.code cannot split are checked inside
  and are visible and forgeable (counted as ``code/in_sandbox_checks``).
- Memory is bounded by RLIMIT_AS per process, not by a cgroup: ``nproc`` processes can each use
  ``memory_mb`` (worst case nproc x memory_mb + tmpfs sizes). Keep nproc small.
- CPU contention: a run can use its CPU quota on every core it forks onto until the wall clock
  kills it; it can slow other work on the machine for up to ``timeout_s``.
- Side channels (timing, /proc/cpuinfo, kernel version in uname) are visible.
- ``/usr`` is readable: anything installed there (compilers, Python packages in /usr/lib) is
  visible and usable, read-only.
- The program's own source and stdin are readable by the program (by design); expected outputs
  are never inside the sandbox (rewards.code compares them in the caller).
- Without root the uid switch is skipped: the run shares the caller's uid, so ``nproc`` counts
  the caller's processes too and the leftover check is by process group only.
"""
from __future__ import annotations

import json
import os
import random
import resource
import selectors
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field

STATUSES = ("ok", "runtime_error", "timeout", "memory_limit", "output_limit", "sandbox_error")
UID_RANGE = (1_000_000, 1_000_000 + (1 << 20))
"""Host uids used for sandbox runs (unused by real accounts); one random uid per run."""
WORKER_UID_RANGE = (UID_RANGE[1], UID_RANGE[1] + (1 << 20))
"""Host uids of isolated math workers (worker_command), apart from the runs' so leftovers stay countable."""
PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
_SYSTEM_ROOT = ["--ro-bind", "/usr", "/usr",
                "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
                "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
                "--proc", "/proc", "--dev", "/dev"]
"""bwrap arguments both code runs and isolated workers start from: /usr read-only, a fresh /proc, a minimal /dev."""


@dataclass
class ExecResult:
    status: str
    """One of STATUSES."""
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    """The program's exit code (128+N when killed by signal N inside the sandbox); None if we killed it."""
    wall_s: float = 0.0
    reason: str = ""
    """Human-readable detail for non-ok statuses (e.g. 'killed after 2.0 s wall clock')."""
    extra: dict = field(default_factory=dict)
    """Bytes read from side channels (``result_fd``), for rewards.code."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def find_python() -> str | None:
    """The interpreter used inside the sandbox: a system Python under /usr (which is bound read-only)."""
    env = os.environ.get("AHA_SANDBOX_PYTHON")
    if env:
        return env
    for p in PYTHON_CANDIDATES:
        if os.path.exists(p):
            return p
    return None


def sandbox_available() -> tuple[bool, str]:
    """(True, '') if execute() can work here, else (False, why) — for skips and clear errors."""
    if shutil.which("bwrap") is None:
        return False, "bwrap not found (Debian: apt-get install -y bubblewrap)"
    if find_python() is None:
        return False, f"no system python under /usr ({', '.join(PYTHON_CANDIDATES)})"
    r = execute("print(1)", timeout_s=10)
    if r.status != "ok" or r.stdout.strip() != "1":
        return False, f"bwrap does not run here: {r.status}: {r.reason or r.stderr[-300:]}"
    return True, ""


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _uid_pids(uid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process owned by uid (state as in /proc/PID/stat: R, S, Z, ...)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid != uid:
                    continue
                with open(f"/proc/{name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0].decode()
                out.append((int(name), state))
            except (OSError, IndexError):
                pass
    return out


def _kill_uid(uid: int, deadline_s: float = 10.0) -> bool:
    """SIGKILL every process of uid until only zombies we cannot reap are left. True if clean.

    Zombies of the run are reaped when they are our children (the caller is a subreaper, see
    become_subreaper()); otherwise they hold nothing but a pid, wait for their parent, and are
    ignored here (the uid is never reused, so they cannot count against a later run's nproc).
    """
    end = time.monotonic() + deadline_s
    while True:
        live = []
        for pid, state in _uid_pids(uid):
            if state in ("Z", "X"):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except (ChildProcessError, OSError):
                    pass
                continue
            live.append(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not live:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.005)


def become_subreaper() -> bool:
    """Make this process a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so that a sandboxed
    program orphaned by its killed bwrap is re-parented here and execute() can reap it. Pool workers and the CLI
    call this; a long-lived caller that also has its own children should not."""
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _dirs_then_bind(paths: list[str]) -> list[str]:
    """bwrap arguments binding each path read-only at the same place, its parents created 0755
    (bwrap makes missing parents 0700, which a dropped uid could not traverse)."""
    out, made = [], {"/"}
    for p in sorted({os.path.realpath(x) for x in paths}):
        parts = p.strip("/").split("/")
        for i in range(1, len(parts)):
            d = "/" + "/".join(parts[:i])
            if d not in made:
                out += ["--perms", "0755", "--dir", d]
                made.add(d)
        out += ["--ro-bind", p, p]
        made.add(p)
    return out


def worker_command(argv: list[str], binds: list[str], env: dict[str, str], memory_mb: int = 4096,
                   nproc: int = 16, tmp_mb: int = 64) -> tuple[list[str], list[int], dict]:
    """The command, fds to pass and Popen keywords that run a long-lived Python worker (the math
    workers of rewards.pool) isolated like a code run: own pid / mount / network / ipc / uts
    namespaces, an empty read-only root with only ``/usr`` and ``binds`` (read-only, at the same
    paths), a private ``/tmp``, an empty environment plus ``env``, the seccomp filter, rlimits.

    The interpreter and its packages may sit where a fresh uid cannot read (``/root/.pyenv``), so
    as root bwrap runs privileged (no user namespace), keeps only CAP_SETUID / CAP_SETGID, and
    the worker drops itself to a fresh uid (``--drop-to UID``, appended to argv) after importing
    its libraries and before it reads any task: from then on it has no capabilities, no host
    files it could write, and ``nproc`` counts only its own processes. Not root: bwrap makes a
    user namespace as for code runs (``--disable-userns`` inside) and the worker keeps our uid.
    The caller closes the returned fds after starting the process.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("bwrap not found: the isolated reward workers need bubblewrap "
                           "(Debian: apt-get install -y bubblewrap), or set reward.isolation: none")
    from rewards.seccomp import filter_fd
    sec_fd = filter_fd()
    root = os.geteuid() == 0
    cmd = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--as-pid-1", "--die-with-parent", "--new-session", "--clearenv", *_SYSTEM_ROOT,
           "--perms", "1777", "--size", str(tmp_mb << 20), "--tmpfs", "/tmp", *_dirs_then_bind(binds)]
    if root:
        cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--disable-userns"]
    cmd += ["--seccomp", str(sec_fd), "--remount-ro", "/", "--chdir", "/tmp", "--hostname", "reward-worker"]
    for k, v in {"HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", **env}.items():
        cmd += ["--setenv", k, v]
    uid = random.randrange(*WORKER_UID_RANGE) if root else None
    cmd += list(argv) + (["--drop-to", str(uid)] if uid is not None else [])
    limits = [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_NPROC, nproc),
              (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_CORE, 0)]

    def preexec() -> None:
        for which, value in limits:
            resource.setrlimit(which, (value, value))
    return cmd, [sec_fd], {"preexec_fn": preexec, "env": {}, "uid": uid}


def drop_privileges(uid: int) -> None:
    """In an isolated worker started as root (worker_command): become ``uid`` with no groups and
    no capabilities, for good. Raises if anything is left."""
    # After this bwrap's --die-with-parent no longer reaches us (the kernel checks kill permission
    # for a parent-death signal, and bwrap keeps no CAP_KILL): the pool kills a worker by its uid
    # (rewards.sandbox._kill_uid) and replaces one whose bwrap died; the worker exits at EOF of
    # its task pipe when the pool's process goes away.
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    if os.getresuid() != (uid, uid, uid) or int(status["CapEff"], 16) or int(status["CapPrm"], 16):
        raise RuntimeError(f"could not drop to uid {uid}: uid {os.getresuid()}, CapEff {status['CapEff'].strip()}")
    if status.get("NoNewPrivs", "0").strip() != "1":
        raise RuntimeError("no_new_privs is not set: refusing to run unfiltered")


def execute(source: str, stdin: str = "", timeout_s: float = 2.0, memory_mb: int = 256, *,
            argv: list[str] | None = None, files: dict[str, str] | None = None,
            max_output_bytes: int = 1 << 20, max_stderr_bytes: int = 64 << 10,
            nproc: int = 16, file_size_mb: int = 16, tmp_mb: int = 32, nofile: int = 64,
            result_fd: bool = False, seccomp: bool = True) -> ExecResult:
    """Run ``source`` as ``/sandbox/main.py`` with ``stdin``; never raises for what the program does.

    ``files`` maps extra read-only files under /sandbox (name -> text). With ``result_fd=True`` the
    program gets the number of a write-only pipe as ``argv[1]``; what it writes there comes back
    in ``result.extra['result']`` (bytes), separate from stdout. ``seccomp=False`` drops the
    system-call filter and ``--disable-userns`` (benchmarks and tests of the filter only).

    >>> execute("print(input()[::-1])", stdin="abc").stdout
    'cba\\n'
    >>> execute("while True: pass", timeout_s=0.5).status
    'timeout'
    """
    t0 = time.monotonic()
    bwrap, python = shutil.which("bwrap"), find_python()
    if bwrap is None:
        return ExecResult("sandbox_error", reason="bwrap not found (Debian: apt-get install -y bubblewrap)")
    if python is None:
        return ExecResult("sandbox_error", reason="no system python under /usr for the sandbox")
    root = os.geteuid() == 0
    uid = random.randrange(*UID_RANGE) if root else os.getuid()
    fds: list[int] = []
    try:
        src_fd = _memfd("main.py", source.encode("utf-8", "surrogatepass"))
        in_fd = _memfd("stdin", stdin.encode("utf-8", "surrogatepass"))
        status_r, status_w = os.pipe()
        fds += [src_fd, in_fd, status_r, status_w]
        pass_fds = [src_fd, status_w]
        # --as-pid-1: the program is pid 1 of its pid namespace, so no process of ours (bwrap's
        # reaper init) shares the sandbox with it: nothing there to read, write or signal but itself
        cmd = [bwrap, "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session", "--clearenv",
               "--json-status-fd", str(status_w), *_SYSTEM_ROOT,
               "--size", str(1 << 20), "--tmpfs", "/dev/shm",
               "--size", str(tmp_mb << 20), "--tmpfs", "/tmp",
               "--ro-bind-data", str(src_fd), "/sandbox/main.py"]
        if seccomp:
            from rewards.seccomp import filter_fd
            try:
                sec_fd = filter_fd()
            except Exception as e:  # noqa: BLE001 - fail closed: no filter, no run
                return ExecResult("sandbox_error", reason=f"seccomp filter unavailable: {type(e).__name__}: {e}")
            fds.append(sec_fd)
            pass_fds.append(sec_fd)
            # no user namespaces inside (bwrap 0.8), and the filter loaded just before exec
            cmd += ["--unshare-user", "--disable-userns", "--seccomp", str(sec_fd)]
        for name, text in (files or {}).items():
            if "/" in name or name in ("", ".", "..", "main.py"):
                return ExecResult("sandbox_error", reason=f"bad sandbox file name {name!r}")
            fd = _memfd(name, text.encode("utf-8", "surrogatepass"))
            fds.append(fd)
            pass_fds.append(fd)
            cmd += ["--ro-bind-data", str(fd), f"/sandbox/{name}"]
        res_r = res_w = None
        if result_fd:
            res_r, res_w = os.pipe()
            fds += [res_r, res_w]
            pass_fds.append(res_w)
        cmd += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--hostname", "sandbox",
                "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
                "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
                "--setenv", "PYTHONIOENCODING", "utf-8",
                python, "-I", "-S", "/sandbox/main.py"]
        if result_fd:
            cmd.append(str(res_w))
        cmd += list(argv or [])

        cpu = max(1, int(timeout_s + 1.999))
        limits = [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu),
                  (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_FSIZE, file_size_mb << 20),
                  (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0),
                  (resource.RLIMIT_MSGQUEUE, 0), (resource.RLIMIT_MEMLOCK, 0)]

        def preexec() -> None:  # runs in the child after the uid switch, before exec
            for which, value in limits:
                hard = value + 1 if which == resource.RLIMIT_CPU else value
                resource.setrlimit(which, (value, hard))
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)

        kw = dict(user=uid, group=uid, extra_groups=[]) if root else {}
        try:
            proc = subprocess.Popen(cmd, stdin=in_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env={}, close_fds=True, pass_fds=pass_fds, preexec_fn=preexec,
                                    start_new_session=True, cwd="/", **kw)
        except OSError as e:
            return ExecResult("sandbox_error", reason=f"could not start bwrap: {e}", wall_s=time.monotonic() - t0)
        for fd in (src_fd, in_fd, status_w) + ((res_w,) if res_w is not None else ()):
            os.close(fd)
            fds.remove(fd)

        out, err, res = bytearray(), bytearray(), bytearray()
        killed = ""
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, (out, max_output_bytes))
        sel.register(proc.stderr, selectors.EVENT_READ, (err, max_stderr_bytes))
        if res_r is not None:
            os.set_blocking(res_r, False)
            sel.register(res_r, selectors.EVENT_READ, (res, max_output_bytes))
        deadline = t0 + timeout_s
        open_streams = 2 + (res_r is not None)
        while open_streams and not killed:
            left = deadline - time.monotonic()
            if left <= 0:
                killed = "timeout"
                break
            for key, _ in sel.select(timeout=left):
                buf, cap = key.data
                fd = key.fd if isinstance(key.fileobj, int) else key.fileobj.fileno()
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                buf += chunk
                if len(buf) > cap:
                    del buf[cap:]
                    killed = "output_limit"
                    break
        sel.close()
        if killed:
            _kill_tree(proc)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 0.5 if not killed else 5)
        except subprocess.TimeoutExpired:
            killed = killed or "timeout"
            _kill_tree(proc)
            proc.wait(timeout=5)
        wall = time.monotonic() - t0
        if res_r is not None and not killed:  # drain what is left on the side channel
            try:
                while True:
                    chunk = os.read(res_r, 1 << 16)
                    if not chunk or len(res) > max_output_bytes:
                        break
                    res += chunk
            except BlockingIOError:
                pass
        status_text = b""
        os.set_blocking(status_r, False)
        try:
            status_text = os.read(status_r, 1 << 16)
        except BlockingIOError:
            pass
        clean = _kill_uid(uid) if root else True
        stdout = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        result = ExecResult("ok", stdout, stderr, None, wall, extra={"result": bytes(res)})
        if not clean:
            result.extra["leftover"] = True
        if killed == "timeout":
            result.status, result.reason = "timeout", f"killed after {timeout_s:g} s wall clock"
            return result
        if killed == "output_limit":
            result.status, result.reason = "output_limit", f"output over {max_output_bytes} bytes"
            return result
        info = _parse_status(status_text)
        if "child-pid" not in info:
            result.status = "sandbox_error"
            result.reason = f"bwrap failed before the program started (exit {proc.returncode}): {stderr.strip()[-300:]}"
            return result
        code = info.get("exit-code", proc.returncode)
        result.exit_code = code
        if code == 0:
            return result
        sig = code - 128 if code > 128 else 0
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and wall >= cpu - 0.05):
            result.status, result.reason = "timeout", f"CPU time limit ({cpu} s)"
        elif sig == signal.SIGXFSZ:
            result.status, result.reason = "output_limit", f"file size limit ({file_size_mb} MB)"
        elif _memory_error(stderr):
            result.status, result.reason = "memory_limit", f"MemoryError (limit {memory_mb} MB)"
        else:
            result.status = "runtime_error"
            result.reason = f"exit code {code}" + (f" (signal {signal.Signals(sig).name})" if sig in signal.Signals._value2member_map_ else "")
        return result
    finally:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def _memory_error(stderr: str) -> bool:
    tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
    return bool(tail) and ("MemoryError" in tail[0] or "Cannot allocate memory" in tail[0])


def _parse_status(text: bytes) -> dict:
    info: dict = {}
    for line in text.decode("utf-8", "replace").splitlines():
        try:
            info.update(json.loads(line))
        except ValueError:
            pass
    return info


def _kill_tree(proc: subprocess.Popen) -> None:
    for f in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            f()
        except OSError:
            pass
