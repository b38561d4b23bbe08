"""``aha`` command line: ``aha train CONFIG.yaml [key=value ...] [--resume]``, ``aha resume RUN_DIR``,
``aha demo [r1]``, ``aha report RUN_DIR``, ``aha plot RUN_DIR``, ``aha sandbox``; on a Ray cluster
through its Jobs API (cluster/jobs.py): ``aha submit CONFIG.yaml --address http://HEAD:8265``,
``aha status [JOB]``, ``aha logs JOB``, ``aha scale JOB rollout=N``, ``aha stop JOB``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo.yaml")
DEMO_R1_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo_r1.yaml")
STOPPED = 3
"""Exit code of a job stopped on request (``aha stop``); ``aha submit`` passes it on."""


def _train(config: str | None, overrides: list[str], address: str | None, resume: bool = False) -> int:
    from cluster.config import load_config, to_dict

    try:
        cfg = load_config(config, overrides)
    except (ValueError, OSError) as e:
        print(f"aha: bad config: {e}", file=sys.stderr)
        return 2
    if address:
        cfg.run.address = address
    import yaml

    from cluster.controller import Controller, StageFailed, Stopped, start_ray

    try:  # the run directory, the resume plan and every data source: before any actor starts
        ctl = Controller(cfg, resume=resume)
    except (ValueError, OSError) as e:
        print(f"aha: bad config: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(ctl.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    ctl.prefetch()  # the first stage's tokenizer loads while Ray starts
    start_ray(cfg)
    try:
        results = ctl.run()
    except ValueError as e:  # a stage's own output cannot feed the next (e.g. nothing kept)
        print(f"aha: {e}\naha: the finished stages are kept; fix the config and resume with --resume",
              file=sys.stderr)
        return 1
    except StageFailed as e:  # a dead learner, a lost node: the message says how to resume
        import traceback
        traceback.print_exception(e.__cause__ or e)  # where it failed, then the one line that matters
        print(f"aha: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # `aha stop`: the stage wrote its in-stage checkpoint first
        print(f"aha: {e}", file=sys.stderr)
        return STOPPED
    from cluster.report import plot_curves, plot_stages, summary_markdown, summary_text, where_to_look

    rows = ctl.summary_rows()
    print(f"\nrun directory: {ctl.run_dir}\n{summary_text(rows)}")
    with open(os.path.join(ctl.run_dir, "summary.md"), "w") as f:
        f.write(f"# {cfg.run.name}\n\n{summary_markdown(rows)}\n")
    with open(os.path.join(ctl.run_dir, "summary.json"), "w") as f:
        json.dump({"eval": results, "samples": ctl.sample_counts, "stages": rows}, f, indent=1)
    try:
        plot_curves(ctl.run_dir)
        plot_stages(ctl.run_dir)
    except Exception as e:  # noqa: BLE001 - the run itself succeeded; say why there is no plot
        print(f"aha: could not plot the curves: {e}", file=sys.stderr)
    rel = os.path.relpath(ctl.run_dir)  # absolute when outside the working directory (a Ray job's copy)
    print(where_to_look(os.path.abspath(ctl.run_dir) if rel.startswith("..") else rel, _self_command()))
    return 0


def _resume(run_dir: str, overrides: list[str], address: str | None) -> int:
    """Resume a run from its own resolved config (``RUN_DIR/config.yaml``)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        print(f"aha: {run_dir} holds no config.yaml: not a run directory", file=sys.stderr)
        return 2
    root, name = os.path.split(os.path.abspath(run_dir))
    return _train(path, [*overrides, f"run.root={root}", f"run.name={name}"], address, resume=True)


def _self_command() -> str:
    """How the user invoked aha (``.venv/bin/aha`` from ``make demo``), for the hint lines."""
    me = sys.argv[0] if sys.argv else ""
    if os.path.basename(me) == "aha" and os.path.exists(me):
        rel = os.path.relpath(me)
        return rel if rel.startswith(".") or os.sep in rel else "aha"
    return "aha"


def _report(run_dir: str, samples: int) -> int:
    from cluster.report import report

    try:
        print(report(run_dir, samples))
    except FileNotFoundError as e:
        print(f"aha: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sandbox"]:
        from rewards.cli import sandbox_main
        return sandbox_main(argv[1:])
    p = argparse.ArgumentParser(prog="aha", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run a job from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted.key=value (e.g. learner.lr=1e-5)")
    t.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else local)")
    t.add_argument("--resume", action="store_true",
                   help="continue runs/<run.name>: skip the stages it finished, redo the first unfinished one")
    rs = sub.add_parser("resume", help="continue a run directory from its first unfinished stage")
    rs.add_argument("run_dir")
    rs.add_argument("overrides", nargs="*", help="operational overrides (run.timeout_s=...)")
    rs.add_argument("--address")
    d = sub.add_parser("demo", help="the embedded demos: `aha demo` (R1-Zero: SFT then GRPO) or "
                                    "`aha demo r1` (the whole R1 recipe, ~20 min on 2 cores)")
    d.add_argument("overrides", nargs="*", help="'r1' first for the R1 recipe, then dotted.key=value")
    d.add_argument("--address")
    d.add_argument("--resume", action="store_true")
    pl = sub.add_parser("plot", help="PNG curves per stage under RUN_DIR/plots/")
    pl.add_argument("run_dir")
    r = sub.add_parser("report", help="table, curves.png and sample trajectories of a run directory")
    r.add_argument("run_dir", help="e.g. runs/demo")
    r.add_argument("--samples", type=int, default=3, help="trajectories to print (default 3)")
    sub.add_parser("sandbox", help="run a Python file in the code sandbox (see `aha sandbox -h`)")
    on_cluster = "Ray Jobs API address (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, else http://127.0.0.1:8265)"
    sb = sub.add_parser("submit", help="run a job on a Ray cluster through its Jobs API, following its logs")
    sb.add_argument("config")
    sb.add_argument("overrides", nargs="*", help="dotted.key=value")
    sb.add_argument("--address", help=on_cluster)
    sb.add_argument("--job-id", help="the Ray submission id (default aha-<run.name>-<6 hex>)")
    sb.add_argument("--no-follow", action="store_true", help="print the job id and return")
    sb.add_argument("--resume", action="store_true", help="the job resumes run.root/run.name (aha train --resume)")
    sb.add_argument("--python", help="the job's interpreter on the head node (default: this one where it "
                                     "exists there, else python)")
    sb.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an environment variable of the job")
    st = sub.add_parser("status", help="the aha jobs on a cluster, or one job's state, stage, step and pools")
    st.add_argument("job", nargs="?")
    st.add_argument("--address", help=on_cluster)
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.add_argument("--python", help=argparse.SUPPRESS)
    lg = sub.add_parser("logs", help="a job's logs, followed until it ends")
    lg.add_argument("job")
    lg.add_argument("--address", help=on_cluster)
    lg.add_argument("--no-follow", action="store_true", help="print the logs so far and return")
    sc = sub.add_parser("scale", help="resize a running job's pools: aha scale JOB rollout=N [reward=N]")
    sc.add_argument("job")
    sc.add_argument("pools", nargs="+", metavar="POOL=N")
    sc.add_argument("--address", help=on_cluster)
    sc.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the controller (default 120)")
    sc.add_argument("--python", help=argparse.SUPPRESS)
    sp = sub.add_parser("stop", help="stop a job after a checkpoint (then `aha resume RUN_DIR`)")
    sp.add_argument("job")
    sp.add_argument("--address", help=on_cluster)
    sp.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the controller's checkpoint before stopping it through Ray")
    sp.add_argument("--python", help=argparse.SUPPRESS)
    a, extra = p.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:  # overrides written after an option (`aha train C.yaml --resume key=value`)
        if a.cmd == "scale":
            a.pools = [*a.pools, *extra]
        elif hasattr(a, "overrides"):
            a.overrides = [*a.overrides, *extra]
        else:
            p.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.cmd == "train":
        return _train(a.config, a.overrides, a.address, a.resume)
    if a.cmd == "resume":
        return _resume(a.run_dir, a.overrides, a.address)
    if a.cmd == "demo":
        if a.overrides[:1] == ["r1"]:
            return _train(DEMO_R1_CONFIG, a.overrides[1:], a.address, a.resume)
        return _train(DEMO_CONFIG, a.overrides, a.address, a.resume)
    if a.cmd == "plot":
        from cluster.report import plot_stages
        if not os.path.isdir(a.run_dir):
            print(f"aha: no run directory {a.run_dir}", file=sys.stderr)
            return 2
        paths = plot_stages(a.run_dir)
        print("\n".join(paths) if paths else f"aha: {a.run_dir} has no metrics to plot")
        return 0 if paths else 2
    if a.cmd == "report":
        return _report(a.run_dir, a.samples)
    if a.cmd in ("submit", "status", "logs", "scale", "stop"):
        return _on_cluster(a)
    return 2


def _on_cluster(a) -> int:
    from cluster import jobs

    if a.cmd != "submit":  # Ray's own INFO/WARNING lines of each control job's upload are noise here
        import ray.dashboard.modules.dashboard_sdk  # noqa: F401 - sets its logger's level on import
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):
            logging.getLogger(name).setLevel(logging.ERROR)

    try:
        if a.cmd == "submit":
            return jobs.submit(a.config, a.overrides, a.address, a.job_id, not a.no_follow, a.python,
                               a.env, a.resume)
        if a.cmd == "status":
            return jobs.status(a.job, a.address, a.json, a.python)
        if a.cmd == "logs":
            return jobs.logs(a.job, a.address, not a.no_follow)
        if a.cmd == "scale":
            return jobs.scale(a.job, a.pools, a.address, a.timeout, a.python)
        return jobs.stop(a.job, a.address, a.timeout, a.python)
    except jobs.JobsError as e:
        print(f"aha: {e}", file=sys.stderr)
        return e.rc
    except Exception as e:  # noqa: BLE001 - Ray's AuthenticationError, named here without importing Ray
        if type(e).__name__ != "AuthenticationError":
            raise
        print(f"aha: the cluster uses token authentication and refused this client: set RAY_AUTH_MODE=token "
              f"and the head's token (RAY_AUTH_TOKEN, or ~/.ray/auth_token)\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
