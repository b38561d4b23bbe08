"""Killable worker processes for verifications that may hang or crash (math checks, code runs).

``WorkerPool(size).run(tasks)`` sends each task to a long-lived worker process
(``python -m rewards._worker``, started once, imports math-verify once) and returns one
``Outcome`` per task, in order. It never raises for a task:

- a task past its deadline gets its worker SIGKILLed (with the worker's whole process group)
  and scores ``Outcome(ok=False, reason='timeout')``;
- a worker that dies mid-task has the task retried once on another worker (it may have died of
  something else), then gives ``reason='crash (exit N)'`` / ``'crash (signal N)'``;
- a dead or killed worker is replaced at once; the replacement imports in the background while
  the other workers keep going;
- if workers cannot start at all (e.g. a broken install), the remaining tasks fail with
  ``reason='worker_start_failed: <last stderr line>'`` instead of waiting forever.

Wire format: 4-byte big-endian length + pickle, over the worker's stdin/stdout (which the worker
moves off fds 0/1 so nothing a library prints can corrupt the channel). Only the parent's own
tasks go through it; nothing from model output is unpickled in the parent except plain results
produced by our worker code.

``WorkerPool(size, isolated=True)`` starts each worker through ``rewards.sandbox.worker_command``
(bubblewrap, the seccomp filter, a read-only view of the interpreter, a fresh uid when root); the
Scorer uses that for math checks. A worker is killed with its process group and, isolated, by
its uid; one whose process died while idle is replaced before it gets a task.

Plain Python, no Ray: the Ray reward actor wraps a Scorer, which owns the pools.
"""
from __future__ import annotations

import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

_HDR = struct.Struct(">I")
_GRACE_S = 0.5
"""The worker's own alarm fires at timeout_s; the parent SIGKILLs it this much later."""
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Task:
    kind: str
    """Worker handler name: 'math', 'code', 'ping', 'sleep' (tests), 'crash' (tests)."""
    payload: Any
    timeout_s: float
    """Wall-clock limit from the moment a worker takes the task."""


@dataclass
class Outcome:
    ok: bool
    value: Any = None
    reason: str = "ok"
    wall_s: float = 0.0


def encode(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HDR.pack(len(data)) + data


_THREADS = dict(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _isolated_binds() -> list[str]:
    """What an isolated worker needs to see: the interpreter, its packages, and rewards/."""
    import site
    paths = [sys.base_prefix, sys.prefix, os.path.join(_PKG_PARENT, "rewards")]
    paths += [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    paths = [os.path.realpath(p) for p in paths]
    # only the outermost of nested paths (a venv's site-packages lies inside the venv)
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


class _Worker:
    def __init__(self, startup_timeout_s: float, isolated: bool = False, memory_mb: int = 4096):
        self.stderr = tempfile.TemporaryFile()
        self.uid: int | None = None
        argv = [sys.executable, "-m", "rewards._worker"]
        if isolated:
            from rewards.sandbox import worker_command
            env = {"PYTHONPATH": _PKG_PARENT, **_THREADS}
            cmd, fds, kw = worker_command(argv, _isolated_binds(), env, memory_mb=memory_mb)
            self.uid = kw.pop("uid")
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
            env["PYTHONPATH"] = _PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            cmd, fds, kw = argv, [], {"env": {**env, **_THREADS}}
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                start_new_session=True, close_fds=True, pass_fds=fds, **kw)
        finally:
            for fd in fds:
                os.close(fd)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = bytearray()
        self.ready = False
        self.task_index: int | None = None
        self.deadline = time.monotonic() + startup_timeout_s
        self.started = time.monotonic()

    @property
    def fd(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, index: int, task: Task) -> None:
        self.task_index = index
        self.started = time.monotonic()
        self.deadline = self.started + task.timeout_s + _GRACE_S
        self.proc.stdin.write(encode((task.kind, task.payload, task.timeout_s)))
        self.proc.stdin.flush()

    def read_messages(self) -> tuple[list[Any], bool]:
        """Messages fully received so far, and whether the pipe hit EOF."""
        eof = False
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            self.buf += chunk
        msgs = []
        while len(self.buf) >= 4:
            (n,) = _HDR.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            msgs.append(pickle.loads(bytes(self.buf[4:4 + n])))
            del self.buf[:4 + n]
        return msgs, eof

    def kill(self) -> str:
        """SIGKILL the worker and its process group; return how it ended."""
        for target in (lambda: os.killpg(self.proc.pid, signal.SIGKILL), lambda: self.proc.kill()):
            try:
                target()
            except (ProcessLookupError, PermissionError, OSError):
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if self.uid is not None:  # an isolated worker's own processes (it forked past its bwrap)
            from rewards.sandbox import _kill_uid
            _kill_uid(self.uid)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        rc = self.proc.returncode
        return f"signal {-rc}" if rc is not None and rc < 0 else f"exit {rc}"

    def stderr_tail(self) -> str:
        try:
            self.stderr.seek(0)
            lines = self.stderr.read().decode(errors="replace").strip().splitlines()
            return lines[-1][:300] if lines else "no stderr"
        except (OSError, ValueError):
            return "no stderr"


class WorkerPool:
    """A fixed number of killable worker processes.

    >>> pool = WorkerPool(1)
    >>> pool.run([Task("ping", None, 30.0)])[0].value
    'pong'
    >>> pool.close()
    """

    def __init__(self, size: int = 1, startup_timeout_s: float = 120.0, max_start_failures: int = 3,
                 isolated: bool = False, memory_mb: int = 4096):
        if size < 1:
            raise ValueError(f"WorkerPool size must be >= 1, got {size}")
        self.size = size
        self.startup_timeout_s = startup_timeout_s
        self.max_start_failures = max_start_failures
        self.isolated, self.memory_mb = isolated, memory_mb
        self.counters: dict[str, float] = {"worker_starts": 0, "worker_kills": 0, "worker_crashes": 0}
        self._start_failures = 0
        self._last_start_error = ""
        self._workers: list[_Worker] = []
        self._closed = False
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        self.counters["worker_starts"] += 1
        self._workers.append(_Worker(self.startup_timeout_s, self.isolated, self.memory_mb))

    def _retire(self, w: _Worker, sel: selectors.BaseSelector | None) -> str:
        if sel is not None:
            try:
                sel.unregister(w.fd)
            except (KeyError, ValueError):
                pass
        how = w.kill()
        if w in self._workers:
            self._workers.remove(w)
        return how

    def run(self, tasks: list[Task]) -> list[Outcome]:
        """Run tasks on the workers; one Outcome per task, same order. Blocks until all are done."""
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        results: list[Outcome | None] = [None] * len(tasks)
        queue = self._queue = deque(range(len(tasks)))
        self._attempts: dict[int, int] = {}
        sel = selectors.DefaultSelector()
        for w in self._workers:
            sel.register(w.fd, selectors.EVENT_READ, w)
        remaining = len(tasks)
        try:
            while remaining:
                # hand queued tasks to idle ready workers
                for w in list(self._workers):
                    if queue and w.ready and w.task_index is None:
                        if w.proc.poll() is not None:  # its process (bwrap, if isolated) died while idle
                            self._replace(w, sel, results, "crash")
                            continue
                        i = queue.popleft()
                        try:
                            w.send(i, tasks[i])
                        except (BrokenPipeError, OSError):
                            queue.appendleft(i)
                            w.task_index = None
                            self._retire(w, sel)
                            self.counters["worker_crashes"] += 1
                            self._spawn()
                            sel.register(self._workers[-1].fd, selectors.EVENT_READ, self._workers[-1])
                now = time.monotonic()
                wait = max(0.0, min((w.deadline for w in self._workers), default=now + 1) - now)
                events = sel.select(timeout=min(wait, 1.0))
                for key, _ in events:
                    w = key.data
                    msgs, eof = w.read_messages()
                    for msg in msgs:
                        if msg == "ready":
                            w.ready = True
                            self._start_failures = 0
                            w.deadline = float("inf")
                        elif w.task_index is not None:
                            ok, value, reason = msg
                            results[w.task_index] = Outcome(ok, value, reason, time.monotonic() - w.started)
                            remaining -= 1
                            w.task_index = None
                            w.deadline = float("inf")
                    if eof:
                        self._replace(w, sel, results, "crash")
                        remaining = len(tasks) - sum(r is not None for r in results)
                now = time.monotonic()
                for w in list(self._workers):
                    if now >= w.deadline:
                        self._replace(w, sel, results, "timeout")
                        remaining = len(tasks) - sum(r is not None for r in results)
                if self._start_failures >= self.max_start_failures and not any(w.ready for w in self._workers):
                    reason = f"worker_start_failed: {self._last_start_error}"
                    while queue:
                        results[queue.popleft()] = Outcome(False, None, reason)
                    remaining = len(tasks) - sum(r is not None for r in results)
        finally:
            sel.close()
        return results  # type: ignore[return-value]

    def _replace(self, w: _Worker, sel, results: list, why: str) -> None:
        index, was_ready = w.task_index, w.ready
        if not was_ready:
            self._last_start_error = w.stderr_tail() if why == "crash" else "startup timed out"
        how = self._retire(w, sel)
        if index is not None:
            if why == "timeout":
                self.counters["worker_kills"] += 1
                results[index] = Outcome(False, None, "timeout", time.monotonic() - w.started)
            else:
                self.counters["worker_crashes"] += 1
                self._attempts[index] = self._attempts.get(index, 0) + 1
                if self._attempts[index] < 2:  # the worker may have died of something else: retry once
                    self._queue.appendleft(index)
                else:
                    results[index] = Outcome(False, None, f"crash ({how})", time.monotonic() - w.started)
        elif not was_ready:
            self._start_failures += 1
        w.stderr.close()
        self._spawn()
        sel.register(self._workers[-1].fd, selectors.EVENT_READ, self._workers[-1])

    def wait_ready(self, timeout_s: float = 120.0) -> bool:
        """Block until every worker has finished importing (optional; run() waits as needed)."""
        return all(o.ok for o in self.run([Task("ping", None, timeout_s) for _ in range(self.size)]))

    def close(self) -> None:
        """Kill every worker process. Idempotent."""
        self._closed = True
        for w in list(self._workers):
            w.kill()
            w.stderr.close()
        self._workers.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
