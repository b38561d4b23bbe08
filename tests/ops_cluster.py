"""A Ray cluster started the way a user starts one (``ray start --head``, then ``ray start
--address`` for every further node), for the tests that act on a job from outside."""
import json
import os
import socket
import subprocess
import sys
import time

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """``cpus[0]`` CPUs on the head, one more node per further entry; ``resources[k]`` gives node
    k custom resources. ``address`` (GCS) and ``dashboard`` (http) once entered."""

    def __init__(self, tmp, cpus=(4,), resources=None, metrics_port: int | None = None):
        self.tmp, self.cpus, self.resources = str(tmp), list(cpus), resources or {}
        self.metrics_port = metrics_port
        self.address = self.dashboard = ""
        self.env = {**os.environ, "RAY_ADDRESS": ""}

    def _start(self, args):
        out = subprocess.run([RAY, "start", *args, "--disable-usage-stats"], env=self.env,
                             capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")

    def __enter__(self):
        port, dash = free_port(), free_port()
        head = ["--head", f"--port={port}", f"--num-cpus={self.cpus[0]}", "--include-dashboard=true",
                f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--temp-dir={self.tmp}"]
        if self.resources.get(0):
            head.append(f"--resources={json.dumps(self.resources[0])}")
        if self.metrics_port:
            head.append(f"--metrics-export-port={self.metrics_port}")
        self._start(head)
        # the head enabled token auth (~/.ray/auth_token): this process talks to it too
        from actors.common import use_cluster_token
        use_cluster_token()
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        for k, n in enumerate(self.cpus[1:], start=1):
            self.add_node(n, self.resources.get(k))
        return self

    def add_node(self, cpus, resources=None):
        args = [f"--address={self.address}", f"--num-cpus={cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self._start(args)

    def __exit__(self, *exc):
        """Stops this cluster's processes only (``ray stop`` would stop every Ray on the machine)."""
        import psutil

        procs = [p for p in psutil.process_iter(["cmdline"])
                 if any(self.tmp in a or self.address in a or f":{self.address.split(':')[-1]}" in a for a in (p.info["cmdline"] or []))
                 and p.pid != os.getpid()]
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=30)


def actors_of(cluster, class_name: str, name_suffix: str = "") -> list[dict]:
    """Alive actors of a class (state API over the dashboard): ``[{"pid", "name", "node_id"}]``."""
    from ray.util.state import list_actors

    got = list_actors(address=cluster.dashboard, filters=[("class_name", "=", class_name),
                                                          ("state", "=", "ALIVE")], limit=1000)
    return [{"pid": a.pid, "name": a.name, "node_id": a.node_id} for a in got
            if (a.name or "").endswith(name_suffix)]


def wait_for(cond, timeout_s, proc=None, what="condition"):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the job ended first (rc {proc.returncode})")
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s} s")
