"""Stage-level bookkeeping of a job: ``runs/<name>/pipeline.json``, stage hashes, atomic outputs.

- Each stage has a **hash** of everything that decides its result: the job's sections, the
  stages up to and including it (so changing a stage invalidates it and every later one), minus
  operational settings (run name, root, address, timeouts, dashboard).
- A stage's outputs (checkpoint, dataset) are written under a temporary name and renamed when
  complete, with a ``manifest.json`` holding the stage hash (:func:`commit`): a half-written
  stage is never taken for a finished one.
- ``pipeline.json`` records each stage's status (``running`` / ``done`` / ``failed`` with the
  error), outputs, results and the job-wide step at its end. :meth:`Pipeline.plan` decides, on resume, which stages are finished
  (status done, manifests present, hash unchanged) and refuses, naming what changed, when a
  finished stage's config is no longer the one it ran with.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any

OPERATIONAL = ("name", "root", "address", "dashboard", "timeout_s", "if_exists", "tensorboard",
               "checkpoint_every")
"""run.* settings that do not change what a stage computes."""


def hashed_config(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    for k in OPERATIONAL:
        d["run"].pop(k, None)
    return json.loads(json.dumps(d, default=str))  # as pipeline.json holds it (tuples are lists)


def stage_hash(cfg_dict: dict, i: int) -> str:
    return hashlib.sha256(json.dumps(_upto(cfg_dict, i), sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ``['stages.1.steps: 10 -> 20']``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff(old.get(k), new.get(k), f"{where}.{k}".lstrip("."))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for j, (a, b) in enumerate(zip(old, new)) for d in diff(a, b, f"{where}.{j}")]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def tmp_path(final: str) -> str:
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp")


def commit(tmp: str, final: str, manifest: dict) -> str:
    """Write ``manifest.json`` into ``tmp`` and rename it to ``final`` (replacing a stale one)."""
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def manifest_hash(path: str) -> str | None:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f).get("stage_hash")
    except (OSError, ValueError):
        return None


class Pipeline:
    def __init__(self, run_dir: str, cfg):
        self.path = os.path.join(run_dir, "pipeline.json")
        self.cfg = cfg
        self.config = hashed_config(cfg)
        self.hashes = [stage_hash(self.config, i) for i in range(len(cfg.stages))]
        self.state: dict = {"stages": {}}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.state = json.load(f)

    def plan(self) -> list[dict | None]:
        """Per stage, its finished record (to skip) or None (to run). Only a prefix of stages is
        skipped: after the first one that runs, every later one runs too. Raises ValueError when
        a finished stage ran with another config."""
        out: list[dict | None] = []
        old_cfg = self.state.get("config")
        for i, st in enumerate(self.cfg.stages):
            rec = self.state["stages"].get(st.name)
            if (out and out[-1] is None) or rec is None or rec.get("status") != "done":
                out.append(None)
                continue
            if rec.get("hash") != self.hashes[i]:
                changed = diff(_upto(old_cfg, i), _upto(self.config, i)) if old_cfg else []
                raise ValueError(
                    f"cannot resume: stage {st.name} finished with another config"
                    + (f" (changed: {'; '.join(changed[:5])})" if changed else "")
                    + ". Restore the config to resume, or start over (run.if_exists=overwrite, or "
                    "another run.name)")
            if not all(manifest_hash(p) == self.hashes[i] for p in rec.get("committed", [])) or \
                    not all(os.path.exists(p) for p in rec["outputs"].values() if isinstance(p, str)):
                out.append(None)  # its outputs are gone or were rewritten: redo it
                continue
            out.append(rec)
        return out

    def begin(self, i: int) -> None:
        st = self.cfg.stages[i]
        self.state["stages"][st.name] = {"type": st.type, "status": "running", "hash": self.hashes[i],
                                         "started": time.time(), "outputs": {}}
        self._write()

    def finish(self, i: int, outputs: dict, results: dict, global_step: int, committed: list[str],
               samples: dict) -> None:
        rec = self.state["stages"][self.cfg.stages[i].name]
        rec.update(status="done", outputs=outputs, results=results, global_step=global_step,
                   committed=committed, samples=samples, finished=time.time())
        self._write()

    def fail(self, i: int, error: str, status: str = "failed") -> None:
        self.state["stages"][self.cfg.stages[i].name].update(status=status, error=error[:2000],
                                                             finished=time.time())
        self._write()

    def manifest(self, i: int) -> dict:
        st = self.cfg.stages[i]
        return {"stage": st.name, "type": st.type, "stage_hash": self.hashes[i], "written": time.time()}

    def _write(self) -> None:
        self.state["config"] = self.config
        self.state["order"] = [st.name for st in self.cfg.stages]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _upto(cfg_dict: dict, i: int) -> dict:
    return {**{k: v for k, v in cfg_dict.items() if k != "stages"}, "stages": cfg_dict["stages"][:i + 1]}


def forget(run_dir: str, names: list[str], keep: dict[str, tuple[int, int]] | None = None) -> None:
    """Before stages ``names`` run again on resume: drop their rows from metrics.jsonl and
    eval.jsonl, their trajectories, intermediate checkpoints and half-written outputs (TensorBoard
    event files keep the old points). ``keep[name] = (step, parts)``: the stage resumes from its
    in-stage checkpoint at ``step``; its rows up to that step and its first ``parts`` trajectory
    files stay."""
    import glob

    keep = keep or {}
    names_set = set(names)
    for f in ("metrics.jsonl", "eval.jsonl"):
        path = os.path.join(run_dir, f)
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            lines = fh.readlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the last line of a job killed mid-write
            name = row.get("stage")
            if name not in names_set or (name in keep and row.get("step", 0) <= keep[name][0]):
                kept.append(line if line.endswith("\n") else line + "\n")
        with open(path + ".tmp", "w") as fh:
            fh.writelines(kept)
        os.replace(path + ".tmp", path)
    for n in names:
        if n in keep:
            parts = sorted(glob.glob(os.path.join(run_dir, "trajectories", n, "part-*")))
            for p in parts[keep[n][1]:] + glob.glob(os.path.join(run_dir, "checkpoints", f".{n}.tmp")):
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            continue
        for p in [os.path.join(run_dir, "trajectories", n), os.path.join(run_dir, "trajectories", f"eval-{n}"),
                  os.path.join(run_dir, "checkpoints", f".{n}.tmp"), os.path.join(run_dir, "datasets", f".{n}.tmp"),
                  *glob.glob(os.path.join(run_dir, "checkpoints", f"{n}-step*"))]:
            if os.path.exists(p):
                shutil.rmtree(p)
