"""A real two-node Ray cluster on this machine, started the way a user starts one:

    ray start --head --port=P --dashboard-port=D --num-cpus=1 --resources='{"head": 1}' ...
    ray start --address=127.0.0.1:P --num-cpus=1 --resources='{"node2": 4}'

Both are ``ray`` CLI processes, so the cluster is what ``aha submit`` meets on a user's machines:
a Jobs API on the dashboard, a GCS address, two raylets (placement by custom resource is real).
What it does differently from a user, so that it can share this machine with other Ray instances:

- every port a second instance would clash on is a free one (GCS, dashboard, Ray Client server,
  each raylet's dashboard agent);
- each node has its own temp dir (``<tmp>/h``, ``<tmp>/n``; short: Unix socket paths are limited
  to 107 bytes). Two raylets sharing one temp dir share its ``runtime_resources/``: when one
  node's runtime-env agent finds a job's ``working_dir`` unused it deletes the directory the
  other node's job driver runs in (real machines each have their own ``/tmp/ray``);
- token authentication (Ray's default for a new head once a token exists) with a fresh token in
  ``RAY_AUTH_TOKEN``, not the user's ``~/.ray/auth_token``; :attr:`RayCluster.env` carries it, and
  ``RAY_AUTH_MODE=token``, to every client;
- teardown never runs ``ray stop`` (which stops every Ray instance of the machine): it ends the
  processes carrying this cluster's marker variable (``AHA_TEST_CLUSTER=<temp dir>``, inherited
  by every raylet, worker and job driver) or naming its temp dir, SIGTERM then SIGKILL.

The test process itself does not join the cluster (a process that already ran a local Ray keeps
its first auth settings); tests talk to it from subprocesses started with ``env=cluster.env``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import psutil

BIN = os.path.dirname(sys.executable)
"""The venv's bin directory (``ray``, ``python``), first on the cluster's PATH as in an activated venv."""
MARKER = "AHA_TEST_CLUSTER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    def __init__(self, head_cpus: int = 1, node_cpus: int = 1, head_resources: dict | None = None,
                 node_resources: dict | None = None):
        self.head_cpus, self.node_cpus = head_cpus, node_cpus
        self.head_resources = head_resources if head_resources is not None else {"head": 1}
        self.node_resources = node_resources if node_resources is not None else {"node2": 4}
        self.temp_dir = tempfile.mkdtemp(prefix="ahar-", dir="/tmp")
        self.port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        self.env = {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", MARKER: self.temp_dir,
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        """What a client of this cluster runs with (``subprocess.run(..., env=cluster.env)``)."""

    def _ray_start(self, args: list[str], timeout: float) -> None:
        cmd = [os.path.join(BIN, "ray"), "start", *args, "--disable-usage-stats"]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")

    def add_node(self, name: str, cpus: int, resources: dict, timeout: float = 120.0) -> None:
        """One more node (``ray start --address``) with its own temp dir ``<temp dir>/<name>``."""
        alive = len([x for x in self.nodes() if x["alive"]])
        self._ray_start([f"--address={self.gcs_address}", f"--num-cpus={cpus}",
                         f"--resources={json.dumps(resources)}", f"--temp-dir={self.temp_dir}/{name}",
                         f"--dashboard-agent-listen-port={free_port()}"], timeout)
        self.wait_nodes(alive + 1, timeout)

    def node_processes(self, name: str) -> list[psutil.Process]:
        """The processes of node ``name`` (``h`` the head, ``n`` the second node, or one added):
        those naming its temp dir (raylet, agents) and their children (workers, their engines)."""
        mark = f"{self.temp_dir}/{name}/"
        return _with_children(lambda p: any(mark in c for c in (p.info["cmdline"] or [])))

    def kill_node(self, name: str) -> int:
        """The machine of node ``name`` is gone: SIGKILL every process of it at once, raylet first
        (no graceful drain, no goodbye to the GCS). Returns how many processes were killed."""
        procs = sorted(self.node_processes(name), key=lambda p: _name(p) != "raylet")
        if not procs:
            raise RuntimeError(f"node {name!r} of the test cluster has no processes")
        _kill_all(procs, timeout=10)
        return len(procs)

    def node_of(self, pid: int) -> str | None:
        """The name of the node whose processes include ``pid``."""
        for name in os.listdir(self.temp_dir):
            if any(p.pid == pid for p in self.node_processes(name)):
                return name
        return None

    def actors(self, class_name: str, name_suffix: str = "") -> list[dict]:
        """Alive actors of a class, from the dashboard's state API over HTTP (with the cluster's
        token): ``[{"pid", "name", "node_id"}]``."""
        q = urllib.parse.urlencode({"limit": 1000, "detail": "false", "filter_keys": ["class_name", "state"],
                                    "filter_predicates": ["=", "="], "filter_values": [class_name, "ALIVE"]},
                                   doseq=True)
        req = urllib.request.Request(f"{self.dashboard_url}/api/v0/actors?{q}",
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            got = json.load(r)["data"]["result"]["result"]
        return [{"pid": a["pid"], "name": a.get("name") or "", "node_id": a["node_id"]} for a in got
                if (a.get("name") or "").endswith(name_suffix)]

    def start(self, timeout: float = 120.0) -> "RayCluster":
        try:
            self._ray_start(["--head", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                             "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
                             f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={self.head_cpus}",
                             f"--resources={json.dumps(self.head_resources)}", f"--temp-dir={self.temp_dir}/h"],
                            timeout)
            self._ray_start([f"--address={self.gcs_address}", f"--num-cpus={self.node_cpus}",
                             f"--resources={json.dumps(self.node_resources)}", f"--temp-dir={self.temp_dir}/n",
                             f"--dashboard-agent-listen-port={free_port()}"], timeout)
            self.wait_nodes(2, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def python(self, code: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``code`` in a fresh interpreter with this cluster's client environment, in the
        project root (``tests.*`` imports)."""
        return subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def nodes(self) -> list[dict]:
        """``ray.nodes()`` of the cluster (alive and dead), read by a driver that joins it."""
        out = self.python("import json, ray\n"
                          f"ray.init(address={self.gcs_address!r}, log_to_driver=False, logging_level='ERROR')\n"
                          "print('NODES ' + json.dumps([{'alive': n['Alive'], 'resources': n['Resources'], "
                          "'node_id': n['NodeID']} for n in ray.nodes()]))")
        # Ray may print its own lines too (a warning about a node's lagging heartbeats after one
        # was killed): the answer is the marked line
        got = [x for x in out.stdout.splitlines() if x.startswith("NODES ")]
        if out.returncode != 0 or not got:
            raise RuntimeError(f"could not read the cluster's nodes:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return json.loads(got[-1][len("NODES "):])

    def wait_nodes(self, n: int, timeout: float, at_most: bool = False) -> list[dict]:
        """Wait until at least ``n`` nodes are alive, or with ``at_most`` until the GCS has counted
        the killed ones dead and at most ``n`` are left (the GCS may place actors on a killed node
        until its health checks fail)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                nodes = [x for x in self.nodes() if x["alive"]]
            except (RuntimeError, subprocess.TimeoutExpired):  # a read while a node goes: again
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
                continue
            done = len(nodes) <= n if at_most else len(nodes) >= n
            if done or time.monotonic() > deadline:
                if not done:
                    raise RuntimeError(f"{len(nodes)} nodes alive after {timeout:.0f}s, wanted "
                                       f"{'at most' if at_most else 'at least'} {n}")
                return nodes
            time.sleep(1.0)

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: the marker in its environment, or the temp dir in its
        command line (and their children)."""
        me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        found = _with_children(lambda p: p.pid not in me and (
            any(self.temp_dir in c for c in (p.info["cmdline"] or []))
            or p.environ().get(MARKER) == self.temp_dir))
        return [p for p in found if p.pid not in me]

    def stop(self, grace_s: float = 10.0) -> None:
        """End this cluster's processes (raylets first, so they stop their workers), then delete
        its temp dir. Leaves every other Ray instance of the machine alone."""
        procs = self.processes()
        first = [p for p in procs if _name(p) in ("raylet", "gcs_server")]
        for group in (first, procs):
            for p in group:
                try:
                    p.terminate()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(group, timeout=grace_s / 2)
        _kill_all(self.processes(), timeout=5)
        left = [p.pid for p in self.processes() if _alive(p)]
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"processes of the test cluster survived its teardown: {left}")


def _with_children(match) -> list[psutil.Process]:
    """The processes for which ``match(p)`` holds (``p.info["cmdline"]`` is filled in), and all
    their descendants, each once."""
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if match(p):
                for q in (p, *p.children(recursive=True)):
                    found.setdefault(q.pid, q)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return list(found.values())


def _kill_all(procs: list[psutil.Process], timeout: float) -> None:
    """SIGKILL ``procs`` (gone ones are skipped) and wait up to ``timeout`` for them to exit."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(cond, timeout_s: float, proc=None, what: str = "condition"):
    """Poll ``cond`` every 0.5 s until it returns something true, and return that; fail after
    ``timeout_s``, or at once when ``proc`` (a job) ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            log = getattr(proc, "log_path", None)  # set by the tests' start_job
            tail = open(log, errors="replace").read()[-4000:] if log else ""
            raise AssertionError(f"{what}: the job ended first (rc {proc.returncode})\n{tail}")
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s:.0f} s")
