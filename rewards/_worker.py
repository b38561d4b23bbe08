"""Worker process main loop (started by rewards.pool.WorkerPool as ``python -m rewards._worker``).

Reads ``(kind, payload, timeout_s)`` frames, answers ``(ok, value, reason)`` frames. Handlers run on
the main thread under a SIGALRM soft timeout; the parent SIGKILLs us if that does not fire.
The worker is a child subreaper, so processes orphaned by sandbox runs (a program whose bwrap
was killed) are re-parented here and reaped after every task instead of piling up as zombies.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import sys

_HDR = struct.Struct(">I")
PR_SET_CHILD_SUBREAPER = 36


class SoftTimeout(BaseException):
    """Raised by the alarm; a BaseException so library `except Exception` blocks do not swallow it."""


def _on_alarm(signum, frame):
    raise SoftTimeout()


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _write(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = _HDR.pack(len(data)) + data
    while data:
        n = os.write(fd, data)
        data = data[n:]


def reap_children() -> None:
    """Reap every exited child (we are a subreaper: orphans of sandbox runs land here)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _handle(kind: str, payload, timeout_s: float):
    if kind == "ping":
        return True, "pong", "ok"
    if kind == "math":
        from rewards.mathcheck import math_equal
        gold, pred = payload
        score, reason = math_equal(gold, pred)
        return True, score, reason
    if kind == "code":
        from rewards.code import run_code_task
        return True, run_code_task(payload), "ok"
    if kind == "sleep":  # tests: a task that hangs in Python
        import time
        time.sleep(payload)
        return True, None, "ok"
    if kind == "crash":  # tests: a task that kills its worker
        os._exit(3)
    if kind == "block":  # tests: a hang the soft alarm cannot interrupt (needs the parent's SIGKILL)
        import time
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(payload)
        return True, None, "ok"
    return False, None, f"unknown task kind {kind!r}"


def main() -> None:
    # Move the protocol off fds 0/1 so prints from libraries cannot corrupt it.
    fd_in, fd_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    sys.stdout = open(os.devnull, "w")
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGALRM, _on_alarm)
    from rewards.mathcheck import warm_up
    warm_up()
    if "--drop-to" in sys.argv:  # isolated worker started as root (rewards.sandbox.worker_command)
        from rewards.sandbox import drop_privileges
        drop_privileges(int(sys.argv[sys.argv.index("--drop-to") + 1]))
    _write(fd_out, "ready")
    while True:
        hdr = _read_exact(fd_in, 4)
        if hdr is None:
            return
        body = _read_exact(fd_in, _HDR.unpack(hdr)[0])
        if body is None:
            return
        kind, payload, timeout_s = pickle.loads(body)
        signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 0.01))
        try:
            try:
                reply = _handle(kind, payload, timeout_s)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except SoftTimeout:
            reply = (False, None, "timeout")
        except RecursionError:
            reply = (False, None, "error: RecursionError")
        except MemoryError:
            reply = (False, None, "error: MemoryError")
        except Exception as e:  # noqa: BLE001 - every failure becomes a reason string
            reply = (False, None, f"error: {type(e).__name__}: {str(e)[:200]}")
        reap_children()
        _write(fd_out, reply)


if __name__ == "__main__":
    main()
