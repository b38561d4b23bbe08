"""Running jobs on a Ray cluster through the Ray Jobs API: ``aha submit|status|stop|scale|logs``.

``aha submit CONFIG.yaml [overrides] --address http://HEAD:8265`` validates the config here (a bad
config fails before anything is submitted), then submits ``python -m cluster.cli train CONFIG
overrides`` as a Ray job whose submission id (``aha-<run.name>-<6 hex>`` unless ``--job-id``) is
also the job's ``AHA_JOB_ID``: the name of its control actor (``cluster/control.py``), through
which ``aha status``, ``aha scale`` and ``aha stop`` reach the running controller.

What travels with the job:

- **Code**: the project root (the directory holding ``cluster/``) as the job's ``working_dir``,
  without ``runs/``, ``.venv/``, ``.git/`` and build output (:data:`EXCLUDES`). Every actor of the
  job imports from that copy, on every node.
- **The config**: a config inside the project root is named by its path relative to it; one
  outside (or under an excluded folder, e.g. ``runs/NAME/config.yaml``) is shipped whole in the
  ``AHA_JOB_CONFIG`` environment variable and written to a temporary file on the head node.
  Relative paths *inside* the config (data files, ``model.path``) resolve against the job's working
  directory, the copy of the project root: submit from the project root to check them here.
- **Python**: the entrypoint runs this interpreter (``sys.executable``) when that path exists on
  the head node (a cluster on this machine, or one built from the same image path), else
  ``python`` from the head node's PATH (a cluster whose image has aha installed); ``--python``
  names one.
- **Environment**: ``AHA_JOB_ID``, ``TOKENIZERS_PARALLELISM=false``, ``HF_HUB_OFFLINE=1``,
  ``VLLM_WORKER_MULTIPROC_METHOD=spawn``, ``--env KEY=VALUE`` ones, and
  ``RAY_OVERRIDE_JOB_RUNTIME_ENV=1``: the driver's own ``ray.init(runtime_env=...)`` sets some of
  the same variables, which Ray otherwise refuses as a conflict.

**Where the run directory goes.** The working directory is a temporary copy on the head node, so a
run directory inside it would be lost. When the cluster's head is this machine (the address is
``localhost``, one of this machine's addresses, or ``auto``) the job gets ``run.root=<the absolute
path of run.root here>`` (default ``<cwd>/runs``): the run lands where ``aha train`` would have
put it. On a remote cluster give ``run.root=/shared/storage/runs`` (storage every node and you can
read); a relative ``run.root`` is left as it is, with a warning.

**Control over HTTP.** The Jobs API is all an ``http://`` address reaches, so ``aha status JOB``,
``aha scale`` and ``aha stop`` submit a short *control job* (``python -m cluster.control KIND
JOB``, no CPUs, id ``ahactl-...``, deleted when done) and read its answer from its logs: a few
seconds each. With a Ray address (``auto``, ``HOST:6379``, ``ray://HOST:10001``) they call the
control actor directly.

Exit codes: 0 done; 1 the job failed (``aha submit`` mirrors the driver's exit code, 2 for a bad
config); 2 bad arguments, an unknown job, or no cluster at the address; 3 the job was stopped
(``aha stop``); 130 ``aha submit`` detached on Ctrl-C (the job keeps running).
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shlex
import socket
import sys
import time
import uuid
from datetime import datetime
from urllib.parse import urlsplit

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXCLUDES = ["/.git", "/.venv", "/venv", "/runs", "/build", "/.carry", "/.gpuwork", "/.pytest_cache",
            "/.mypy_cache", "/.ruff_cache", "__pycache__", "*.pyc", "*.egg-info"]
"""Kept out of the job's working_dir upload (gitignore patterns; ``/x`` is at the project root)."""
JOB_ENV = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "VLLM_WORKER_MULTIPROC_METHOD": "spawn", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STOPPED = 3
DETACHED = 130
SHOW = ("reward_mean", "accuracy_mean", "format_mean", "kl", "entropy", "response_len_mean",
        "staleness_mean", "time_step_s", "gen_tokens_per_s", "loss")
"""Numbers of the last metrics row that ``aha status JOB`` prints."""


class JobsError(Exception):
    """A failure to report as one ``aha:`` line with exit code ``rc``."""

    def __init__(self, message: str, rc: int = 2):
        super().__init__(message)
        self.rc = rc


# ---- addresses and the client --------------------------------------------------------------------

def resolve_address(address: str | None) -> str:
    """``--address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the local dashboard."""
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def is_http(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def is_this_machine(address: str) -> bool:
    """Whether the head at ``address`` runs here (so it shares this machine's filesystem)."""
    if address == "auto":
        return True
    host = urlsplit(address if "://" in address else f"x://{address}").hostname or ""
    if host in ("localhost", "0.0.0.0", "::", socket.gethostname()):
        return True
    try:
        ips = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            ips = {ipaddress.ip_address(x[4][0]) for x in socket.getaddrinfo(host, None)}
        except OSError:
            return False
    for ip in ips:
        if ip.is_loopback:
            return True
        with contextlib.suppress(OSError), socket.socket(
                socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))  # binds only to an address of this machine
            return True
    return False


def client(address: str):
    """A JobSubmissionClient for ``address`` (the given address wins over RAY_ADDRESS, which Ray
    would otherwise prefer); :class:`JobsError` when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    from actors.common import use_cluster_token
    use_cluster_token()  # send ~/.ray/auth_token to a `ray start` head with token auth
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobsError(f"cannot reach the Ray Jobs API at {address}: {e}\n"
                        "aha: start a cluster with `ray start --head` (dashboard port 8265), or pass "
                        "--address http://HEAD:8265") from None
    finally:
        os.environ.update(saved)


def job_info(cl, job_id: str, address: str):
    try:
        return cl.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise JobsError(f"no job {job_id!r} at {address} (`aha status --address {address}` lists "
                            "the aha jobs)") from None
        raise


def wait_ended(cl, job_id: str, timeout_s: float):
    """The job's info once it is in a terminal state, or its latest info after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = cl.get_job_info(job_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


def exit_code(info) -> int:
    """What ``aha submit`` exits with for a finished job (see the module docstring)."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return STOPPED
    return info.driver_exit_code or 1


# ---- submit ----------------------------------------------------------------------------------------

def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "run"


def python_cmd(python: str | None) -> str:
    """Shell lines that set ``$PY``: ``python`` given, else this interpreter where it exists on
    the head node, else ``python`` there."""
    if python:
        return f"PY={shlex.quote(python)}; "
    return f'PY={shlex.quote(sys.executable)}; [ -x "$PY" ] || PY=python; '


def shipped_config(config: str) -> str | None:
    """The config's path relative to the project root when the working_dir upload carries it;
    None when it must be shipped (outside the project root, or under an excluded folder)."""
    rel = os.path.relpath(os.path.abspath(config), PROJECT_ROOT)
    parts = rel.split(os.sep)
    if rel.startswith("..") or f"/{parts[0]}" in EXCLUDES or "__pycache__" in parts:
        return None
    return rel


def runtime_env(env_vars: dict) -> dict:
    return {"working_dir": PROJECT_ROOT, "excludes": list(EXCLUDES), "env_vars": dict(env_vars)}


def entrypoint(config_arg: str, overrides: list[str], python: str | None, resume: bool,
               ship_to: str | None = None) -> str:
    """The job's shell command. With ``ship_to`` the config comes from ``$AHA_JOB_CONFIG``."""
    write = f'printf "%s" "$AHA_JOB_CONFIG" > {ship_to} && ' if ship_to else ""
    args = " ".join(shlex.quote(x) for x in overrides)
    return (f"{python_cmd(python)}{write}exec \"$PY\" -m cluster.cli train {config_arg}"
            f"{' ' + args if args else ''}{' --resume' if resume else ''}")


def submit(config: str, overrides: list[str], address: str | None = None, job_id: str | None = None,
           follow_logs: bool = True, python: str | None = None, env: list[str] = (),
           resume: bool = False) -> int:
    from cluster.config import load_config

    try:
        cfg = load_config(config, overrides)
    except (ValueError, OSError) as e:
        print(f"aha: bad config: {e}", file=sys.stderr)
        return 2
    extra_env = {}
    for kv in env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise JobsError(f"--env takes KEY=VALUE, got {kv!r}")
        extra_env[k] = v
    address = resolve_address(address)
    overrides = list(overrides)
    here = is_this_machine(address)
    root = os.path.abspath(cfg.run.root) if here else cfg.run.root
    if here:
        overrides.append(f"run.root={root}")
        run_dir = os.path.join(root, cfg.run.name)
        taken = any(os.path.exists(os.path.join(run_dir, f)) for f in ("metrics.jsonl", "pipeline.json"))
        if taken and not resume and cfg.run.if_exists == "error":
            print(f"aha: bad config: run directory {run_dir} already holds a run; resume it (aha submit "
                  "CONFIG --resume), choose another run.name, or set run.if_exists=overwrite or new",
                  file=sys.stderr)
            return 2
    elif not os.path.isabs(root):
        print(f"aha: warning: run.root={root!r} is relative: the run directory will be inside the job's "
              "temporary working directory on the head node; pass run.root=/shared/storage/runs",
              file=sys.stderr)
    if job_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", job_id):
        raise JobsError(f"--job-id takes letters, digits, '_', '.' and '-', got {job_id!r}")
    cl = client(address)
    sid = job_id or f"aha-{slug(cfg.run.name)}-{uuid.uuid4().hex[:6]}"
    rel = shipped_config(config)
    env_vars = {**JOB_ENV, **extra_env, "AHA_JOB_ID": sid}
    if rel is None:
        with open(config) as f:
            env_vars["AHA_JOB_CONFIG"] = f.read()
        ship_to = f'"${{TMPDIR:-/tmp}}/aha-config-{sid}.yaml"'
        entry = entrypoint(ship_to, overrides, python, resume, ship_to)
    else:
        entry = entrypoint(shlex.quote(rel), overrides, python, resume)
    metadata = {"aha_kind": "job", "run_name": cfg.run.name, "run_root": root,
                "config": os.path.abspath(config), "submitted_from": socket.gethostname()}
    try:
        cl.submit_job(entrypoint=entry, submission_id=sid, runtime_env=runtime_env(env_vars),
                      metadata=metadata)
    except RuntimeError as e:
        raise JobsError(f"the cluster refused the job: {e}", 1) from None
    print(f"aha: submitted job {sid} to {address}", file=sys.stderr)
    print(sid, flush=True)
    if not follow_logs:
        print(hints(sid, address), file=sys.stderr)
        return 0
    return follow(cl, sid, address)


def hints(job_id: str, address: str) -> str:
    a = f" --address {address}"
    return (f"aha:   follow: aha logs {job_id}{a}\naha:   status: aha status {job_id}{a}\n"
            f"aha:   stop:   aha stop {job_id}{a}")


def follow(cl, job_id: str, address: str) -> int:
    """Print the job's logs as they come until it ends; its exit code (Ctrl-C: detach, 130)."""
    try:
        try:
            asyncio.run(_tail(cl, job_id))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - the websocket is a convenience: poll instead
            print(f"aha: log stream broke ({type(e).__name__}: {e}); polling", file=sys.stderr)
            _poll_logs(cl, job_id)
        info = wait_ended(cl, job_id, 60)
    except KeyboardInterrupt:
        print(f"\naha: detached; job {job_id} keeps running\n{hints(job_id, address)}", file=sys.stderr)
        return DETACHED
    rc = exit_code(info)
    what = {0: "", STOPPED: " (stopped)"}.get(rc, f": {info.message}")
    print(f"aha: job {job_id} {info.status}{what}", file=sys.stderr)
    return rc


async def _tail(cl, job_id: str) -> None:
    async for chunk in cl.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _poll_logs(cl, job_id: str) -> None:
    seen = 0
    while True:
        text = cl.get_job_logs(job_id)
        sys.stdout.write(text[seen:])
        sys.stdout.flush()
        seen = len(text)
        if cl.get_job_status(job_id).is_terminal():
            return
        time.sleep(1.0)


def logs(job_id: str, address: str | None = None, follow_logs: bool = True) -> int:
    address = resolve_address(address)
    cl = client(address)
    job_info(cl, job_id, address)
    if not follow_logs:
        sys.stdout.write(cl.get_job_logs(job_id))
        return 0
    return follow(cl, job_id, address)


# ---- the control actor, from here ----------------------------------------------------------------

def control(address: str, cl, job_id: str, kind: str, args: list[str] = (), timeout_s: float = 120.0,
            python: str | None = None) -> tuple[int, dict]:
    """``python -m cluster.control KIND JOB ARGS`` against the job's control actor: a control job
    over an HTTP address, a direct call with a Ray address. Returns (exit code, answer)."""
    if not is_http(address):
        import ray

        from cluster.control import command

        from actors.common import use_cluster_token
        use_cluster_token()  # a `ray start` cluster with token auth
        ray.init(address=address, log_to_driver=False, logging_level="WARNING", configure_logging=False)
        try:
            return command(kind, job_id, list(args), timeout_s)
        finally:
            ray.shutdown()
    for _ in range(2 if kind == "status" else 1):  # a status query may be asked again
        rc, out = _control_job(cl, job_id, kind, args, timeout_s, python)
        if "control_job_failed" not in out:
            break
    return rc, out


def _control_job(cl, job_id: str, kind: str, args: list[str], timeout_s: float, python: str | None):
    sid = f"ahactl-{kind}-{uuid.uuid4().hex[:8]}"
    argv = [kind, job_id, *args, "--timeout", str(timeout_s), "--in-job"]
    entry = f"{python_cmd(python)}exec \"$PY\" -m cluster.control {' '.join(shlex.quote(a) for a in argv)}"
    cl.submit_job(entrypoint=entry, submission_id=sid, entrypoint_num_cpus=0,
                  runtime_env=runtime_env({"HF_HUB_OFFLINE": "1"}),
                  metadata={"aha_kind": "control", "aha_target": job_id})
    info = wait_ended(cl, sid, timeout_s + 120)
    text = cl.get_job_logs(sid)
    # kept, not deleted: the dashboard lists a deleted job's driver as FAILED ("Entrypoint not
    # found"), a false alarm on the page users watch; `aha status` leaves control jobs out
    if not info.status.is_terminal():
        cl.stop_job(sid)
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                out = json.loads(line)
            except ValueError:
                continue
            if isinstance(out, dict):
                rc = out.pop("rc", info.driver_exit_code)
                return (rc if isinstance(rc, int) else 1), out
    tail = "\n".join(text.splitlines()[-15:])
    return 1, {"ok": False, "control_job_failed": True,
               "message": f"control job {sid} {info.status} without an answer: "
                                       f"{(info.message or '').strip()}\n{tail}".strip()}


# ---- status / stop / scale -------------------------------------------------------------------------

def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def is_aha_job(j) -> bool:
    kind = (j.metadata or {}).get("aha_kind")
    return kind == "job" or (kind is None and (j.submission_id or "").startswith("aha-"))


def status(job_id: str | None, address: str | None = None, as_json: bool = False,
           python: str | None = None) -> int:
    address = resolve_address(address)
    cl = client(address)
    if job_id is None:
        jobs = sorted((j for j in cl.list_jobs() if is_aha_job(j)), key=lambda j: j.start_time or 0)
        if as_json:
            print(json.dumps([{"job": j.submission_id, "status": str(j.status), "start_time": j.start_time,
                               "end_time": j.end_time, "run_name": (j.metadata or {}).get("run_name")}
                              for j in jobs]))
            return 0
        if not jobs:
            print(f"no aha jobs at {address}")
            return 0
        print(f"{'JOB':<36} {'STATUS':<10} {'STARTED':<20} {'ENDED':<20} RUN")
        for j in jobs:
            print(f"{j.submission_id:<36} {str(j.status):<10} {_when(j.start_time):<20} "
                  f"{_when(j.end_time):<20} {(j.metadata or {}).get('run_name', '')}")
        return 0
    info = job_info(cl, job_id, address)
    meta = info.metadata or {}
    out = {"job": job_id, "status": str(info.status), "message": info.message,
           "exit_code": info.driver_exit_code, "stopped_on_request": exit_code(info) == STOPPED,
           "start_time": info.start_time, "end_time": info.end_time, "entrypoint": info.entrypoint,
           "run_dir": os.path.join(meta["run_root"], meta["run_name"]) if "run_root" in meta else None}
    if str(info.status) == "RUNNING":
        rc, ctl = control(address, cl, job_id, "status", python=python)
        out["control"] = ctl if rc == 0 else {"error": ctl.get("message", "")}
        out["run_dir"] = ctl.get("run_dir") or out["run_dir"]
    if as_json:
        print(json.dumps(out, default=str))
        return 0
    print(format_status(out))
    return 0


def format_status(out: dict) -> str:
    shown = "STOPPED (aha stop)" if out.get("stopped_on_request") else out["status"]
    lines = [f"job {out['job']}: {shown} (started {_when(out['start_time'])}"
             + (f", ended {_when(out['end_time'])})" if out.get("end_time") else ")")]
    if out["status"] not in ("RUNNING", "SUCCEEDED") and out.get("message"):
        lines.append(f"  {out['message'].strip().splitlines()[-1]}")
    c = out.get("control")
    if c and "error" in c:
        lines.append(f"  controller: not reachable ({c['error']})")
    elif c:
        if c.get("stage"):
            lines.append(f"  stage {c['stage']} ({c.get('stage_type', '?')}): step {c.get('step')}/{c.get('steps')}, "
                         f"weight version {c.get('weight_version')}, {c.get('state', '?')}"
                         f" (published {c.get('age_s', '?')}s ago)")
        else:
            lines.append(f"  controller: {c.get('state', '?')}")
        pools = {k.removeprefix("pool_"): v for k, v in (c.get("pools") or {}).items()
                 if not k.startswith("rollout_engines_")}  # per-engine counters: in last_row
        if pools:
            lines.append("  pools: " + ", ".join(f"{k} {v}" for k, v in pools.items()))
        row = c.get("last_row") or {}
        nums = [f"{k} {row[k]:.4g}" for k in SHOW if isinstance(row.get(k), (int, float))]
        if nums:
            lines.append("  last step: " + ", ".join(nums))
    if out.get("run_dir"):
        lines.append(f"  run dir: {out['run_dir']}")
    return "\n".join(lines)


def _running(cl, job_id: str, address: str):
    info = job_info(cl, job_id, address)
    if info.status.is_terminal():
        raise JobsError(f"job {job_id} is not running: {info.status}", 1)
    return info


def scale(job_id: str, args: list[str], address: str | None = None, timeout_s: float = 120.0,
          python: str | None = None) -> int:
    from cluster.control import parse_scale

    try:
        parse_scale(args)
    except ValueError as e:
        raise JobsError(str(e)) from None
    address = resolve_address(address)
    cl = client(address)
    _running(cl, job_id, address)
    rc, out = control(address, cl, job_id, "scale", args, timeout_s, python)
    print(json.dumps(out, default=str))
    if rc:
        print(f"aha: scale {job_id}: {out.get('message', 'failed')}", file=sys.stderr)
    return rc


def stop(job_id: str, address: str | None = None, timeout_s: float = 120.0, python: str | None = None) -> int:
    """Ask the controller to checkpoint and stop; if it does not answer within ``timeout_s``, or
    the job still runs a minute after it answered, stop the job through Ray."""
    address = resolve_address(address)
    cl = client(address)
    info = job_info(cl, job_id, address)
    meta = info.metadata or {}
    run_dir = os.path.join(meta["run_root"], meta["run_name"]) if "run_root" in meta else None
    if info.status.is_terminal():
        print(f"aha: job {job_id} already ended: {info.status}", file=sys.stderr)
        return 0
    _, out = control(address, cl, job_id, "stop", [], timeout_s, python)
    run_dir = out.get("run_dir") or run_dir
    if out.get("ok"):
        print(f"aha: {out.get('message') or 'stopped'}", file=sys.stderr)
    elif out.get("actor_gone"):  # the driver ended (and took its control actor) right after the stop
        print("aha: the job's controller ended after the stop request; waiting for the job", file=sys.stderr)
    else:
        print(f"aha: the controller did not stop the job cleanly: {out.get('message', '')}", file=sys.stderr)
    if out.get("ok") or out.get("actor_gone"):
        info = wait_ended(cl, job_id, 60)
    forced = not info.status.is_terminal()
    if forced:
        print("aha: stopping it through Ray" + (
            "" if out.get("ok") else ": work since its last checkpoint is lost (a stage without an "
                                     "in-stage checkpoint starts over on resume)"), file=sys.stderr)
        cl.stop_job(job_id)
        info = wait_ended(cl, job_id, 60)
    clean = bool(out.get("ok")) or info.driver_exit_code == STOPPED
    print(json.dumps({"job": job_id, "status": str(info.status), "clean": clean, "run_dir": run_dir,
                      **({"checkpoint": out["checkpoint"]} if out.get("checkpoint") else {})}))
    if run_dir:
        root, name = os.path.split(run_dir)
        print(f"aha: resume with: aha resume {run_dir}\naha:   or on the cluster: aha submit "
              f"{os.path.join(run_dir, 'config.yaml')} run.root={root} run.name={name} --resume "
              f"--address {address}", file=sys.stderr)
    return 0 if info.status.is_terminal() else 1
