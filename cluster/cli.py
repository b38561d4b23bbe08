"""``aha`` command line: ``aha train CONFIG.yaml [key=value ...]``, ``aha demo``, ``aha report RUN_DIR``,
``aha sandbox``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "demo.yaml")


def _train(config: str | None, overrides: list[str], address: str | None) -> int:
    from cluster.config import load_config, to_dict

    try:
        cfg = load_config(config, overrides)
    except (ValueError, OSError) as e:
        print(f"aha: bad config: {e}", file=sys.stderr)
        return 2
    if address:
        cfg.run.address = address
    import yaml

    from cluster.controller import Controller, start_ray

    try:
        ctl = Controller(cfg)
    except ValueError as e:  # e.g. the run directory is taken: before any actor starts
        print(f"aha: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(ctl.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    start_ray(cfg)
    results = ctl.run()
    print(f"\nrun directory: {ctl.run_dir}")
    for stage, r in results.items():
        for when, row in r.items():
            print(f"  {stage:>10} {when:>5}: pass@1 {row['accuracy']:.3f}  cons@{row['k']} {row['cons_at_k']:.3f}")
    with open(os.path.join(ctl.run_dir, "summary.json"), "w") as f:
        json.dump({"eval": results, "samples": ctl.sample_counts}, f, indent=1)
    from cluster.report import plot_curves, where_to_look

    try:
        plot_curves(ctl.run_dir)
    except Exception as e:  # noqa: BLE001 - the run itself succeeded; say why there is no plot
        print(f"aha: could not plot the curves: {e}", file=sys.stderr)
    print(where_to_look(os.path.relpath(ctl.run_dir), _self_command()))
    return 0


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
    d = sub.add_parser("demo", help="the embedded R1-Zero demo: tiny model, arithmetic, SFT then GRPO")
    d.add_argument("overrides", nargs="*")
    d.add_argument("--address")
    r = sub.add_parser("report", help="table, curves.png and sample trajectories of a run directory")
    r.add_argument("run_dir", help="e.g. runs/demo")
    r.add_argument("--samples", type=int, default=3, help="trajectories to print (default 3)")
    sub.add_parser("sandbox", help="run a Python file in the code sandbox (see `aha sandbox -h`)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.cmd == "train":
        return _train(a.config, a.overrides, a.address)
    if a.cmd == "demo":
        return _train(DEMO_CONFIG, a.overrides, a.address)
    if a.cmd == "report":
        return _report(a.run_dir, a.samples)
    return 2


if __name__ == "__main__":
    sys.exit(main())
