"""Remote control of a running job: one small named Ray actor per job.

The controller publishes its status after every step (:meth:`Control.publish`) and, between
steps, takes the requests waiting for it (:meth:`Control.poll`) and reports how each went
(:meth:`Control.ack`). ``aha status|scale|stop`` (``cluster/jobs.py``) and
``python -m cluster.control`` find the actor by name and talk to it; nothing calls back into the
controller, which decides when (and whether) a request is carried out.

The actor lives in the Ray namespace ``aha`` under ``aha-control-<job id>``, where the job id is
``AHA_JOB_ID`` (set by ``aha submit`` to the Ray submission id) or else ``run.name``. It is not
detached: it dies with the job's driver, so a job that ended has no control actor. Two jobs with
the same id on one cluster (two ``aha train`` runs of one ``run.name`` without ``aha submit``)
would share one actor.

    python -m cluster.control status JOB_ID [--address ADDR]
    python -m cluster.control scale JOB_ID rollout=N [reward=N] [--timeout S]
    python -m cluster.control stop JOB_ID [--timeout S]

print one JSON object (the last line of stdout) and exit 0 when it went through, 1 when the
controller refused a request or did not answer within ``--timeout``, 2 when there is no such job.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

log = logging.getLogger(__name__)

CONTROL_NAMESPACE = "aha"
REQUEST_KINDS = ("scale", "stop")
POOLS = ("rollout", "reward")


def job_id_from_env(run_name: str) -> str:
    """The job's id: ``AHA_JOB_ID`` (the Ray submission id under ``aha submit``), else the run name."""
    return os.environ.get("AHA_JOB_ID") or run_name


def control_name(job_id: str) -> str:
    return f"aha-control-{job_id}"


class ControlBoard:
    """What the actor holds, as plain Python: the last published status, the requests not yet
    taken, and the controller's answer to each request by sequence number.

    >>> b = ControlBoard()
    >>> b.request("scale", {"pool": "rollout", "n": 2})
    1
    >>> b.pending()
    [{'seq': 1, 'kind': 'scale', 'args': {'pool': 'rollout', 'n': 2}}]
    >>> b.pending(), b.result(1)
    ([], None)
    >>> b.ack(1, {"ok": True, "message": "rollout pool 1 -> 2"}); b.result(1)["ok"]
    True
    """

    def __init__(self):
        self._status: dict = {}
        self._updated = 0.0
        self._queue: list[dict] = []
        self._results: dict[int, dict] = {}
        self._seq = 0

    def set_status(self, status: dict) -> None:
        """The controller's latest status: stage, stage_type, step, steps, weight_version, pools,
        last_row, state, run_dir (each publish replaces the previous one whole)."""
        self._status = dict(status)
        self._updated = time.time()

    def status(self) -> dict:
        """The last published status with its age (``state: starting`` before the first one)."""
        if not self._updated:
            return {"state": "starting", "pending": len(self._queue)}
        return {**self._status, "age_s": round(time.time() - self._updated, 1), "pending": len(self._queue)}

    def request(self, kind: str, args: dict) -> int:
        """Queue a request for the controller; returns its sequence number (:meth:`result`)."""
        if kind not in REQUEST_KINDS:
            raise ValueError(f"unknown request {kind!r}; known: {', '.join(REQUEST_KINDS)}")
        self._seq += 1
        self._queue.append({"seq": self._seq, "kind": kind, "args": dict(args or {})})
        return self._seq

    def pending(self) -> list[dict]:
        """The requests not yet taken, oldest first; taking them clears the queue."""
        out, self._queue = self._queue, []
        return out

    def ack(self, seq: int, result: dict) -> None:
        """The controller's answer to request ``seq`` (``{"ok": bool, "message": str, ...}``)."""
        self._results[int(seq)] = dict(result)

    def result(self, seq: int) -> dict | None:
        """The answer to request ``seq``, or None while the controller has not answered."""
        return self._results.get(int(seq))


@ray.remote(num_cpus=0)
class JobControl(ControlBoard):
    """The per-job control actor (see the module docstring)."""


class Control:
    """The controller's handle on its job's control actor. Every call is cheap and never raises:
    remote control is an extra, a job runs on without it."""

    POLL_TIMEOUT_S = 5.0

    def __init__(self, actor, job_id: str):
        self.actor, self.job_id = actor, job_id
        self._warned = False

    @staticmethod
    def start(job_id: str) -> "Control":
        """Create (or get) the job's control actor, in namespace ``aha`` whatever the driver's
        namespace; owned by this driver, so it ends with the job, and on the driver's node, so it
        lives as long as the job does (placed elsewhere, a lost node could take the job's control
        with it while the job runs on)."""
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = JobControl.options(name=control_name(job_id), namespace=CONTROL_NAMESPACE,
                                   get_if_exists=True, scheduling_strategy=here).remote()
        log.info("job control: %s (aha status/scale/stop %s)", control_name(job_id), job_id)
        return Control(actor, job_id)

    def _failed(self, what: str, e: Exception) -> None:
        if not self._warned:
            log.warning("job control %s: %s failed (%s: %s); further errors are not logged",
                        self.job_id, what, type(e).__name__, e)
            self._warned = True

    def poll(self) -> list[dict]:
        """The requests waiting for the controller (``[{"seq", "kind", "args"}]``), [] on any error."""
        try:
            return ray.get(self.actor.pending.remote(), timeout=self.POLL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - a lost control actor must not stop training
            self._failed("poll", e)
            return []

    def publish(self, status: dict) -> None:
        """Replace the published status (returns at once)."""
        try:
            self.actor.set_status.remote(status)
        except Exception as e:  # noqa: BLE001
            self._failed("publish", e)

    def ack(self, seq: int, result: dict) -> None:
        """Answer request ``seq``; waits until the actor holds the answer (a job that ends right
        after a ``stop`` must not take its answer down with it)."""
        try:
            ray.get(self.actor.ack.remote(seq, result), timeout=self.POLL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001
            self._failed("ack", e)


# ---- the client side: `python -m cluster.control` and `aha status|scale|stop` -------------------

class NoSuchJob(LookupError):
    """No control actor of that job id: the job ended, never started, or is not an aha job."""


def find(job_id: str):
    """The control actor of ``job_id`` (Ray must be initialised); raises :class:`NoSuchJob`."""
    try:
        return ray.get_actor(control_name(job_id), namespace=CONTROL_NAMESPACE)
    except ValueError:
        raise NoSuchJob(f"no running aha job {job_id!r} (no actor {control_name(job_id)} in "
                        f"namespace {CONTROL_NAMESPACE!r}; it ended, or has not started yet)") from None


def parse_scale(args: list[str]) -> list[dict]:
    """``["rollout=2", "reward=3"]`` -> ``[{"pool": "rollout", "n": 2}, {"pool": "reward", "n": 3}]``."""
    out = []
    for a in args:
        pool, _, n = a.partition("=")
        if pool not in POOLS or not n.isdigit() or int(n) < 1:
            raise ValueError(f"scale takes POOL=N with POOL in {'|'.join(POOLS)} and N >= 1, got {a!r}")
        out.append({"pool": pool, "n": int(n)})
    if not out:
        raise ValueError("scale needs at least one POOL=N, e.g. rollout=4")
    return out


def wait_result(actor, seq: int, timeout_s: float) -> dict | None:
    """Poll for the answer to request ``seq`` for at most ``timeout_s``; None if none came."""
    deadline = time.monotonic() + timeout_s
    while True:
        res = ray.get(actor.result.remote(seq), timeout=30)
        if res is not None or time.monotonic() > deadline:
            return res
        time.sleep(0.1)


def command(kind: str, job_id: str, args: list[str] = (), timeout_s: float = 120.0) -> tuple[int, dict]:
    """Run one client command against a job's control actor; returns (exit code, JSON-able answer).
    Ray must be initialised. ``scale`` with two pools sends two requests, one after the other."""
    if kind not in ("status", *REQUEST_KINDS):
        raise ValueError(f"unknown command {kind!r}; known: status, {', '.join(REQUEST_KINDS)}")
    reqs = [{}] if kind == "stop" else parse_scale(args) if kind == "scale" else []
    try:
        actor = find(job_id)
    except NoSuchJob as e:
        return 2, {"ok": False, "job": job_id, "message": str(e)}
    results: list[dict] = []
    try:
        if kind == "status":
            return 0, {"ok": True, "job": job_id, **ray.get(actor.status.remote(), timeout=30)}
        for r in reqs:
            seq = ray.get(actor.request.remote(kind, r), timeout=30)
            res = wait_result(actor, seq, timeout_s)
            if res is None:
                return 1, {"ok": False, "job": job_id, "seq": seq, "timeout": True, "done": results,
                           "message": f"the controller did not answer {kind}{' ' + json.dumps(r) if r else ''} "
                                      f"within {timeout_s:.0f}s (it answers between GRPO steps; other stages "
                                      "do not); the request stays queued and may still be carried out"}
            results.append({"seq": seq, **res})
            if not res.get("ok"):
                break
    except ray.exceptions.RayActorError as e:
        return 1, {"ok": False, "job": job_id, "actor_gone": True, "done": results,
                   "message": f"the job's control actor went away ({type(e).__name__}): the job ended"}
    except ray.exceptions.GetTimeoutError:
        return 1, {"ok": False, "job": job_id, "done": results,
                   "message": "the job's control actor did not answer within 30s"}
    ok = all(r.get("ok") for r in results)
    out = results[0] if len(results) == 1 else {"ok": ok, "results": results,
                                                 "message": "; ".join(r.get("message", "") for r in results)}
    return (0 if ok else 1), {"job": job_id, **out}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cluster.control", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("status", *REQUEST_KINDS))
    p.add_argument("job_id")
    p.add_argument("args", nargs="*", help="scale: rollout=N and/or reward=N")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "auto",
                   help="Ray cluster (default: RAY_ADDRESS, else auto)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the controller's answer")
    p.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)  # see the end
    a = p.parse_args(argv)
    if a.kind == "scale":
        try:
            parse_scale(a.args)
        except ValueError as e:
            print(json.dumps({"ok": False, "message": str(e), "rc": 2}))
            return 0 if a.in_job else 2
    logging.basicConfig(level=logging.WARNING)
    from actors.common import use_cluster_token
    use_cluster_token()  # a `ray start` cluster with token auth
    ray.init(address=a.address, log_to_driver=False, logging_level=logging.WARNING,
             configure_logging=False)
    try:
        rc, out = command(a.kind, a.job_id, a.args, a.timeout)
    finally:
        ray.shutdown()
    if rc == 2:
        print(f"aha: {out['message']}", file=sys.stderr)
    print(json.dumps({**out, "rc": rc}, default=str), flush=True)
    # a control job (aha status|scale|stop over HTTP) that answered succeeded, whatever the
    # answer: its exit code is in the answer, and the dashboard does not list a FAILED job
    return 0 if a.in_job else rc


if __name__ == "__main__":
    sys.exit(main())
