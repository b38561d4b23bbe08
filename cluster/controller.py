"""The controller: runs a job's stages in order and owns what they share. Components never call it.

For each stage (``cluster/stages/<type>.py`` does the work): skip it when a resumed job finished it
(``cluster/pipeline.py``), merge its overrides and resolve its ``{from_stage: NAME}`` inputs
(``JobConfig.for_stage``, :meth:`Controller.resolve`), make sure the reward pool scores with its
reward config, run it, record its outputs in ``pipeline.json``. The job ends with one table
(``summary.md``) and the plots. Every data source of every stage is loaded and checked in
:meth:`Controller.preflight`, before any actor starts.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import threading
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Iterator

import ray

from actors.reward import RewardPool
from cluster.config import DATA_USED, POLICY_STAGES, JobConfig, ModelConfig, StageConfig
from cluster.evaluation import blame, eval_summary, evaluate  # noqa: F401 - re-exported
from cluster.metrics import PhaseTimer, RunLogger
from cluster.pipeline import Pipeline, commit, forget, tmp_path
from rollout.datasets import (PromptRecord, arithmetic, fit_prompts, load_prompts,
                              overlapping_questions)

log = logging.getLogger(__name__)


def prepare_run_dir(root: str, name: str, if_exists: str) -> str:
    """The run directory, made ready by ``run.if_exists`` before any actor starts: a second run
    with the same name must not append to the first one's metrics with restarted step numbers.
    ``resume`` takes the directory as it is (a resumed job continues it)."""
    import shutil

    path = os.path.join(root, name)
    taken = lambda p: any(os.path.exists(os.path.join(p, f)) for f in ("metrics.jsonl", "pipeline.json"))  # noqa: E731
    if taken(path) and if_exists != "resume":
        if if_exists == "error":
            raise ValueError(f"run directory {path} already holds a run; resume it (aha train CONFIG "
                             "--resume), choose another run.name, or set run.if_exists=overwrite "
                             "(delete it) or run.if_exists=new")
        if if_exists == "overwrite":
            log.warning("run.if_exists=overwrite: deleting the earlier run in %s", path)
            shutil.rmtree(path)
        else:
            n = 2
            while taken(f"{path}-{n}"):
                n += 1
            path = f"{path}-{n}"
            log.info("run directory %s/%s is taken; this run writes to %s", root, name, path)
    os.makedirs(path, exist_ok=True)
    return path


def cycle(records: list, seed: int) -> Iterator:
    rng, order = random.Random(seed), list(records)
    while True:
        rng.shuffle(order)
        yield from order


class Cursor:
    """:func:`cycle` with a position: ``next()`` gives the next record with its draw number in
    ``meta["draw"]`` (what ``rollout.request_seeds`` seeds from); ``Cursor(records, seed, start)``
    continues a stream that had drawn ``start`` records (exact in-stage resume)."""

    def __init__(self, records: list, seed: int, start: int = 0):
        self._it, self.position = cycle(records, seed), 0
        for _ in range(start):
            next(self._it)
        self.position = start

    def __iter__(self):
        return self

    def __next__(self):
        r = next(self._it)
        self.position += 1
        return replace(r, meta={**r.meta, "draw": self.position - 1})


class Controller:
    def __init__(self, cfg: JobConfig, resume: bool = False):
        self.cfg = cfg
        self.run_dir = prepare_run_dir(cfg.run.root, cfg.run.name, "resume" if resume else cfg.run.if_exists)
        self.pipeline = Pipeline(self.run_dir, cfg)
        self.plan = self.pipeline.plan() if resume else [None] * len(cfg.stages)
        self.in_stage: dict[str, dict] = {}  # stage -> its in-stage checkpoint (resumed from)
        if resume:
            redo = [(i, st) for i, (st, rec) in enumerate(zip(cfg.stages, self.plan)) if rec is None]
            if redo:
                i, st = redo[0]
                state = in_stage_checkpoint(self.checkpoint_dir(f"{st.name}-state"), self.pipeline.hashes[i])
                if state:
                    self.in_stage[st.name] = state
            forget(self.run_dir, [st.name for _, st in redo],
                   {n: (s["step"], s["trajectory_parts"]) for n, s in self.in_stage.items()})
        self.control = None
        self.timer = PhaseTimer()
        self.global_step = 0
        self.results: dict[str, dict] = {}
        self.sample_counts: dict[str, dict] = {}  # per GRPO stage: generated / trained / dropped
        self.reward_counters: dict[int, dict] = {}
        self.outputs: dict[str, dict] = {}
        self.evaluated: dict[str, dict] = {}  # checkpoint -> its held-out eval row
        self.last_policy = ""
        self._base = ""
        # held by the prefetch thread while it writes the tiny model and registers its tokenizer
        self._base_lock = threading.RLock()
        self._committed: dict[int, list[str]] = {}
        self._data: dict[tuple, list[PromptRecord]] = {}
        self.rewards: RewardPool | None = None
        self._reward_cfg: dict | None = None
        for st, rec in zip(cfg.stages, self.plan):
            if rec is not None:
                self._restore(st, rec)
        self.preflight()
        self.logger = RunLogger(self.run_dir, cfg.run.tensorboard)

    # ---- inputs -----------------------------------------------------------------------------
    def base_model(self, mc: ModelConfig, tag: str) -> str:
        if mc.path != "tiny":
            return mc.path
        from rollout.tiny import create_tiny_model
        return create_tiny_model(os.path.join(self.run_dir, tag), **{"seed": self.cfg.run.seed, **mc.tiny})

    def model_path(self) -> str:
        """The job's base model (``model``)."""
        with self._base_lock:
            if not self._base:
                self._base = self.base_model(self.cfg.model, "tiny-model")
            return self._base

    def input_model(self, i: int, st: StageConfig) -> str:
        """Stage ``i``'s input checkpoint (StageConfig.model)."""
        m = st.model["from_stage"] if isinstance(st.model, dict) else st.model
        if m == "":
            return self.last_policy or self.model_path()
        if m == "base":
            return self.model_path()
        if m in self.outputs:
            return self.outputs[m]["checkpoint"]
        return m

    def resolve(self, i: int) -> JobConfig:
        """Stage ``i``'s merged config with every ``{from_stage: NAME}`` replaced by NAME's output:
        its dataset in ``data`` (a rejection stage's whole folder for ``data.pairs``), its
        checkpoint elsewhere."""
        job = copy.deepcopy(self.cfg.for_stage(i))

        def dataset(src: Any, key: str) -> Any:
            if isinstance(src, dict) and "from_stage" in src:
                return self.outputs[src["from_stage"]]["dataset_dir" if key == "pairs" else "dataset"]
            if isinstance(src, dict) and "source" in src:
                return {**src, "source": dataset(src["source"], key)}
            return [dataset(s, key) for s in src] if isinstance(src, list) else src
        for key in ("train", "test", "sft", "pairs"):
            setattr(job.data, key, dataset(getattr(job.data, key), key))

        def sub(obj: Any) -> Any:
            if isinstance(obj, dict):
                if set(obj) == {"from_stage"}:
                    return self.outputs[obj["from_stage"]]["checkpoint"]
                return {k: sub(v) for k, v in obj.items()}
            return [sub(v) for v in obj] if isinstance(obj, list) else obj
        job.reward.options = sub(job.reward.options)
        return job

    def records(self, src: str, split: str, job: JobConfig, where: str = "data") -> list[PromptRecord]:
        """The records of a data source, read once per job (callers do not modify the list)."""
        d = job.data
        key = (src, split, json.dumps(d.columns, sort_keys=True), d.seed, job.run.seed, d.max_operand,
               d.heldout_fraction, d.cot, d.cot_mix)
        if key in self._data:
            return self._data[key]
        if src == "arithmetic":
            records = arithmetic(split, seed=d.seed + job.run.seed, max_operand=d.max_operand,
                                 heldout_fraction=d.heldout_fraction, cot=d.cot, cot_mix=d.cot_mix)
        else:
            try:
                records, skipped = load_prompts(src, job.data.columns or None)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if skipped:
                log.warning("%s: %s", where, skipped)
        self._data[key] = records
        return records

    def train_records(self, job: JobConfig) -> list[PromptRecord]:
        """``data.train``'s records; with a list of prompt sets, all of them, each record carrying
        its set's ``reward_weights`` (and its id prefixed by the set's index)."""
        src = job.data.train
        if not isinstance(src, list):
            return self.records(src, "train", job, "data.train")
        out = []
        for j, item in enumerate(src):
            w = item.get("reward_weights") if isinstance(item, dict) else None
            for r in self.records(item["source"] if isinstance(item, dict) else item, "train", job,
                                  f"data.train.{j}"):
                out.append(replace(r, id=f"{j}/{r.id}", meta={**r.meta, **({"reward_weights": w} if w else {})}))
        return out

    def test_prompts(self, job: JobConfig, tok) -> list[PromptRecord]:
        rc = job.rollout
        test, _ = fit_prompts(self.records(job.data.test, "test", job, "data.test")[:job.eval.num_prompts],
                              tok, rc.template, rc.max_model_len, rc.max_tokens, "data.test")
        return test

    def preflight(self) -> None:
        """Load and check every data source every stage reads, before any actor starts (a stage's
        own output is checked when it is written)."""
        for i, st in enumerate(self.cfg.stages):
            if self.plan[i] is not None:
                continue
            job = self.cfg.for_stage(i)
            p = f"stages.{i}." if job is not self.cfg else ""
            for key in DATA_USED[st.type]:
                srcs = getattr(job.data, key)
                for src in srcs if isinstance(srcs, list) else [srcs]:
                    self._preflight_source(p, key, src, job)
            if st.type == "grpo" and "arithmetic" not in (job.data.train, job.data.test) \
                    and all(isinstance(s, str) for s in (job.data.train, job.data.test)):
                shared = overlapping_questions(self.records(job.data.train, "train", job),
                                               self.records(job.data.test, "test", job))
                if shared:
                    log.warning("data.test: %d question(s) also in data.train (held-out scores on them "
                                "are not held out), e.g. %r", len(shared), shared[0][:200])

    def _preflight_source(self, p: str, key: str, src: Any, job: JobConfig) -> None:
        if isinstance(src, dict) and "source" in src:
            src = src["source"]
        if not isinstance(src, str) or src == "":
            return  # {from_stage: NAME}: that stage's output
        if key == "pairs":
            from cluster.stages.reward_model import load_pairs  # (imports the stages, and torch)
            if not load_pairs(src):
                raise ValueError(f"{p}data.pairs {src!r} holds no preference pairs")
            return
        recs = self.records(src, "test" if key == "test" else "train", job, f"{p}data.{key}")
        if key == "sft" and not any(r.solution for r in recs):
            raise ValueError(f"{p}data.sft {src!r} has no 'solution' column (nor GSM8K-style "
                             "'#### answer' text) to train on; map one with data.columns.solution")

    # ---- outputs ----------------------------------------------------------------------------
    def checkpoint_dir(self, tag: str) -> str:
        return os.path.abspath(os.path.join(self.run_dir, "checkpoints", tag))

    def dataset_dir(self, name: str) -> str:
        return os.path.abspath(os.path.join(self.run_dir, "datasets", name))

    def commit(self, i: int, tmp: str, final: str) -> str:
        self._committed.setdefault(i, []).append(final)
        return commit(tmp, final, self.pipeline.manifest(i))

    def save(self, i: int, learners, tag: str) -> str:
        final = self.checkpoint_dir(tag)
        learners.save_hf(tmp_path(final))
        return self.commit(i, tmp_path(final), final)

    # ---- shared pieces ------------------------------------------------------------------------
    def learner_cfg(self, st: StageConfig, job: JobConfig | None = None):
        job = job or self.cfg
        cfg = replace(job.learner, lr=st.lr or job.learner.lr, seed=job.learner.seed + job.run.seed)
        if st.type in ("sft", "distill"):  # no KL term in SFT: a reference model would be memory for nothing
            cfg = replace(cfg, loss=replace(cfg.loss, kl_coef=0.0))
        if cfg.threads == 0:  # auto: all cores when nothing else computes while the learner does
            alone = st.type != "grpo" or job.algo.max_staleness == 0
            cfg = replace(cfg, threads=-1 if alone and cfg.num_actors == 1 and cfg.gpus_per_actor == 0 else 0)
        return cfg

    def use_rewards(self, rc) -> None:
        """The reward pool, (re)started when the stage's reward config differs from the running one."""
        want = dataclasses.asdict(rc)
        if self.rewards is not None and want == self._reward_cfg:
            return
        if self.rewards is not None:
            self.rewards.shutdown()
        self.rewards = RewardPool(rc, num_cpus=self.cfg.run.reward_cpus, start_timeout_s=self.cfg.run.timeout_s,
                                  resources=self.cfg.run.reward_resources, wait=False)  # awaited at first use
        self._reward_cfg, self.reward_counters = want, {}

    def evaluate(self, rollouts, test: list[PromptRecord], job: JobConfig, stage: str, step: int) -> dict:
        return evaluate(self, rollouts, test, job, stage, step)

    def record_eval(self, stage: str, when: str, row: dict, checkpoint: str = "") -> None:
        if row:
            self.results.setdefault(stage, {})[when] = row
            if checkpoint:
                self.evaluated[checkpoint] = row

    def evaluate_checkpoint(self, path: str, st: StageConfig, job: JobConfig) -> dict:
        """Start engines on a checkpoint just to evaluate it (stages without engines of their own)."""
        from actors.rollout import RolloutPool

        if not job.eval.num_prompts:
            return {}
        test = self.test_prompts(job, tokenizer(path))
        rc = job.rollout
        rollouts = RolloutPool(path, replace(rc, seed=rc.seed + job.run.seed), job.run.rollout_cpus,
                               resources=job.run.rollout_resources)
        try:
            row = self.evaluate(rollouts, test, job, st.name, st.steps)
        finally:
            rollouts.shutdown()
        self.record_eval(st.name, "end", row, path)
        return row

    # ---- operations: status, scale and stop requests (``cluster.control``) ------------------
    def publish(self, st: StageConfig, step: int, version: int, row: dict, pools: dict) -> None:
        if self.control is not None:
            self.control.publish({"state": "running", "stage": st.name, "stage_type": st.type,
                                  "step": step, "steps": st.steps, "weight_version": version,
                                  "pools": pools, "run_dir": os.path.abspath(self.run_dir),
                                  "last_row": {k: v for k, v in row.items() if not isinstance(v, dict)}})

    def requests(self) -> list[dict]:
        return self.control.poll() if self.control is not None else []

    def ack(self, req: dict, result: dict) -> None:
        if self.control is not None:
            self.control.ack(req["seq"], result)

    def stopped(self, req: dict, st: StageConfig, step: int, checkpoint: str) -> None:
        """End the job on an ``aha stop`` request, once the in-stage checkpoint is written."""
        msg = (f"stopped on request after step {step} of stage {st.name}; checkpoint {checkpoint}; "
               f"continue with: aha resume {os.path.abspath(self.run_dir)}")
        self.ack(req, {"ok": True, "checkpoint": checkpoint, "step": step, "stage": st.name,
                       "run_dir": os.path.abspath(self.run_dir), "message": msg})
        if self.control is not None:
            self.control.publish({"state": "stopped", "stage": st.name, "step": step,
                                  "run_dir": os.path.abspath(self.run_dir), "checkpoint": checkpoint})
        raise Stopped(msg)

    def _start_control(self) -> None:
        try:
            from cluster.control import Control, job_id_from_env
            self.control = Control.start(job_id_from_env(self.cfg.run.name))
        except Exception as e:  # noqa: BLE001 - the job runs without remote control
            log.warning("job control unavailable (aha status/scale/stop will not reach this job): %s", e)

    def prefetch(self) -> None:
        """In a thread, while Ray starts: write the built-in tiny model if the first stage to run
        starts from it (~3 s: torch and transformers are imported there), then load that stage's
        tokenizer (:func:`prefetch_tokenizer`). Errors are left to the stage's own calls."""
        for i, st in enumerate(self.cfg.stages):
            if self.plan[i] is None:
                threading.Thread(target=self._prefetch, args=(i, st), name="aha-prefetch",
                                 daemon=True).start()
                return

    def _prefetch(self, i: int, st: StageConfig) -> None:
        # under the lock: a stage's model_path() call waits until the tokenizer's load is
        # registered, so its tokenizer() call takes that load rather than starting a second one
        with self._base_lock:
            try:
                path = self.input_model(i, st)
            except Exception as e:  # noqa: BLE001 - the stage meets it again, and reports it
                log.debug("prefetch of stage %s's model failed: %s", st.name, e)
                return
            if os.path.isdir(path):
                prefetch_tokenizer(path)

    # ---- the job ----------------------------------------------------------------------------
    def run(self) -> dict[str, dict]:
        from cluster.stages import RUNNERS

        self._start_control()
        try:
            for i, st in enumerate(self.cfg.stages):
                if self.plan[i] is not None:
                    log.info("stage %s (%s): finished in an earlier run, skipped (outputs %s)",
                             st.name, st.type, self.outputs[st.name])
                    continue
                job = self.resolve(i)
                self.pipeline.begin(i)
                if st.type != "reward_model":
                    self.use_rewards(job.reward)
                log.info("stage %s (%s%s) from %s", st.name, st.type,
                         f", {st.steps} steps" if st.type != "rejection_sample" else "", self.input_model(i, st))
                try:
                    outputs = RUNNERS[st.type](self, i, st, job)
                except BaseException as e:  # recorded for whoever looks; --resume redoes the stage
                    self.pipeline.fail(i, f"{type(e).__name__}: {e}", "stopped" if isinstance(e, Stopped)
                                       else "failed")
                    if isinstance(e, (Stopped, ValueError, KeyboardInterrupt)):
                        raise
                    ckpt = in_stage_checkpoint(self.checkpoint_dir(f"{st.name}-state"),
                                               self.pipeline.hashes[i])
                    raise StageFailed(
                        f"stage {st.name} failed: {type(e).__name__}: {str(e)[:3000]}\n"
                        f"the finished stages are kept{'' if not ckpt else ', and an in-stage checkpoint at step %d' % ckpt['step']}"
                        f"; continue with: aha resume {os.path.abspath(self.run_dir)}") from e
                self.outputs[st.name] = outputs
                if st.type in POLICY_STAGES:
                    self.last_policy = outputs["checkpoint"]
                self.pipeline.finish(i, outputs, self.results.get(st.name, {}), self.global_step,
                                     self._committed.get(i, []), self.sample_counts.get(st.name, {}))
        finally:
            if self.rewards is not None:
                self.rewards.shutdown()
            self.logger.close()
        return self.results

    def _restore(self, st: StageConfig, rec: dict) -> None:
        self.outputs[st.name] = rec["outputs"]
        self.results[st.name] = rec.get("results", {})
        if rec.get("samples"):
            self.sample_counts[st.name] = rec["samples"]
        self.global_step = max(self.global_step, rec.get("global_step", 0))
        if st.type in POLICY_STAGES:
            self.last_policy = rec["outputs"]["checkpoint"]
            if "end" in self.results[st.name]:
                self.evaluated[self.last_policy] = self.results[st.name]["end"]

    def summary_rows(self) -> list[dict]:
        """One row per stage: held-out numbers of the model it produced, what it kept or learnt."""
        rows = []
        for st in self.cfg.stages:
            r, row = self.results.get(st.name, {}), {"stage": st.name, "type": st.type}
            end = r.get("end")
            if end:
                row.update(pass_at_1=end["accuracy"], cons_at_k=end["cons_at_k"], k=end.get("k"),
                           response_len_mean=end.get("response_len_mean"),
                           reflection_words_mean=end.get("reflection_words_mean"),
                           language_mean=end.get("language_mean"))
            if "rejection" in r:
                row.update(kept=r["rejection"]["kept"], samples=r["rejection"]["samples"])
            if "reward_model" in r:
                row["pair_accuracy"] = r["reward_model"]["pair_accuracy"]
            rows.append(row)
        return rows


class StageFailed(RuntimeError):
    """A stage failed for a reason outside the config (a dead learner, a lost node); the message
    says how to resume."""


class Stopped(Exception):
    """The job was stopped on request (``aha stop``) after writing an in-stage checkpoint."""


def in_stage_checkpoint(path: str, stage_hash: str) -> dict | None:
    """The in-stage checkpoint in ``path`` (``state.json`` + ``dir``) when it is complete and was
    written by this stage's config; else None (the stage starts over)."""
    from cluster.pipeline import manifest_hash

    if manifest_hash(path) != stage_hash:
        if os.path.exists(path):
            log.warning("%s was written by another config of the stage: not resumed from", path)
        return None
    with open(os.path.join(path, "state.json")) as f:
        return {**json.load(f), "dir": path}


_PREFETCHED: dict[str, Future] = {}


def prefetch_tokenizer(path: str) -> None:
    """Start loading ``path``'s tokenizer in a thread; the next :func:`tokenizer` call for that
    path takes it. The driver's first one costs ~3 s (importing transformers): this lets it run
    while Ray starts."""
    if path in _PREFETCHED:
        return
    fut: Future = Future()

    def load():
        try:
            fut.set_result(_load_tokenizer(path))
        except BaseException as e:  # noqa: BLE001 - handed to the caller of tokenizer()
            fut.set_exception(e)

    _PREFETCHED[path] = fut
    threading.Thread(target=load, name="aha-tokenizer-prefetch", daemon=True).start()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def tokenizer(path: str):
    """``path``'s tokenizer: a fresh one, or the one :func:`prefetch_tokenizer` loaded (once)."""
    fut = _PREFETCHED.pop(path, None)
    return fut.result() if fut is not None else _load_tokenizer(path)


def start_ray(cfg: JobConfig) -> None:
    """Join ``run.address`` / ``RAY_ADDRESS`` if given, else start a local Ray in-process."""
    if ray.is_initialized():
        return
    address = cfg.run.address or os.environ.get("RAY_ADDRESS") or None
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        from actors.common import use_cluster_token
        use_cluster_token()
        ray.init(address=address, runtime_env=env)
        return
    need = (cfg.rollout.num_actors * cfg.run.rollout_cpus + cfg.reward.num_actors * cfg.run.reward_cpus
            + cfg.learner.num_actors * cfg.run.learner_cpus
            + (cfg.learner.reference_actors * cfg.run.reference_cpus if cfg.learner.reference == "pool" else 0))
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=cfg.run.dashboard,
             runtime_env=env, log_to_driver=True)
