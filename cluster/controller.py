"""The controller: wires the pools for each stage and drives the loop. Components never call it.

A GRPO step, in the algorithm's order, one timer per phase:
    wait_rollout: take G completions for each of ``prompts_per_step`` prompts (generated and scored
                  asynchronously while the previous step trained)
    advantage:    group-relative advantages (learner.losses.group_advantages)
    train:        one clipped policy-gradient update on every data-parallel learner
    sync:         stream the new weights to every rollout engine
then metrics.jsonl / TensorBoard / Parquet trajectories / terminal (untimed: controller overhead).
Each stage reads a checkpoint and writes one: SFT's output is GRPO's input (and its KL reference).
"""
from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter
from dataclasses import replace
from typing import Iterator

import ray

from actors.common import get_all, ref_error
from actors.learner import LearnerGroup
from actors.reward import RewardPool
from actors.rollout import RolloutPool
from actors.stream import RolloutStream
from actors.weight_sync import WeightSync
from cluster.config import JobConfig, StageConfig
from cluster.metrics import PhaseTimer, RunLogger, summary_line
from learner.shaping import prepare_step
from rollout.datasets import (PromptRecord, arithmetic, fit_prompts, load_prompts,
                              overlapping_questions)
from rollout.templates import encode_prompt, encode_target, render
from rollout.types import Sample, from_arrow, to_arrow

log = logging.getLogger(__name__)


def prepare_run_dir(root: str, name: str, if_exists: str) -> str:
    """The run directory, made ready by ``run.if_exists`` before any actor starts: a second run
    with the same name must not append to the first one's metrics with restarted step numbers."""
    import shutil

    path = os.path.join(root, name)
    taken = lambda p: os.path.exists(os.path.join(p, "metrics.jsonl"))  # noqa: E731
    if taken(path):
        if if_exists == "error":
            raise ValueError(f"run directory {path} already holds a run; choose another run.name, "
                             "or set run.if_exists=overwrite (delete it) or run.if_exists=new")
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


def rollout_metrics(samples: list[Sample], learner_version: int) -> dict[str, float]:
    n = max(len(samples), 1)
    comps: dict[str, float] = {}
    for s in samples:
        for k, v in s.reward_components.items():
            comps[k] = comps.get(k, 0.0) + v
    stale = [learner_version - s.weight_version for s in samples]
    reasons = Counter(s.reward_reason for s in samples)
    out = {
        "reward_mean": sum(s.reward for s in samples) / n,
        "accuracy_mean": comps.get("accuracy", 0.0) / n,
        "format_mean": comps.get("format", 0.0) / n,
        "response_len_mean": sum(len(s.response_ids) for s in samples) / n,
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / n,
        "staleness_mean": sum(stale) / n,
        "staleness_max": max(stale, default=0),
        "reflection_words_mean": sum(s.meta.get("reward_metrics", {}).get("reflection_words", 0)
                                     for s in samples) / n,
    }
    for k, v in comps.items():
        out.setdefault(f"{k}_mean", v / n)
    for r, c in reasons.items():
        out[f"reward_reason/{r}"] = c
    return out


class Controller:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.run_dir = prepare_run_dir(cfg.run.root, cfg.run.name, cfg.run.if_exists)
        self.logger = RunLogger(self.run_dir, cfg.run.tensorboard)
        self.timer = PhaseTimer()
        self.global_step = 0
        self.dropped_total = 0
        self.results: dict[str, dict] = {}
        self.sample_counts: dict[str, dict] = {}  # per GRPO stage: generated / trained / dropped
        self.shaping_totals: Counter = Counter()  # masked samples by reason, skipped steps
        self.reward_counters: dict[int, dict] = {}
        self._data: dict[tuple[str, str], list[PromptRecord]] = {}

    # ---- setup ------------------------------------------------------------------------------
    def model_path(self) -> str:
        if self.cfg.model.path != "tiny":
            return self.cfg.model.path
        from rollout.tiny import create_tiny_model
        return create_tiny_model(os.path.join(self.run_dir, "tiny-model"),
                                 **{"seed": self.cfg.run.seed, **self.cfg.model.tiny})

    def data(self, key: str, split: str) -> list[PromptRecord]:
        """The records of ``data.<key>``, read once per job (the overlap check and every stage
        share them; callers do not modify the list)."""
        if (key, split) in self._data:
            return self._data[key, split]
        src = getattr(self.cfg.data, key)
        if src == "arithmetic":
            records = arithmetic(split, seed=self.cfg.data.seed + self.cfg.run.seed,
                                 max_operand=self.cfg.data.max_operand,
                                 heldout_fraction=self.cfg.data.heldout_fraction)
        else:
            records, skipped = load_prompts(src)
            if skipped:
                log.warning("data.%s: %s", key, skipped)
        self._data[key, split] = records
        return records

    # ---- the job ----------------------------------------------------------------------------
    def run(self) -> dict[str, dict]:
        if self.cfg.data.train != "arithmetic" and self.cfg.data.test != "arithmetic":
            shared = overlapping_questions(self.data("train", "train"), self.data("test", "test"))
            if shared:
                log.warning("data.test: %d question(s) also in data.train (held-out scores on them "
                            "are not held out), e.g. %r", len(shared), shared[0][:200])
        path = self.model_path()
        self.rewards = RewardPool(self.cfg.reward, num_cpus=self.cfg.run.reward_cpus,
                                  start_timeout_s=self.cfg.run.timeout_s)
        try:
            for st in self.cfg.stages:
                log.info("stage %s (%s, %d steps) from %s", st.name, st.type, st.steps, path)
                path = (self.sft_stage if st.type == "sft" else self.grpo_stage)(st, path)
        finally:
            self.rewards.shutdown()
            self.logger.close()
        return self.results

    def _learner_cfg(self, st: StageConfig):
        cfg = replace(self.cfg.learner, lr=st.lr or self.cfg.learner.lr,
                      seed=self.cfg.learner.seed + self.cfg.run.seed)
        if st.type == "sft":  # no KL term in SFT: a reference model would be memory for nothing
            cfg = replace(cfg, loss=replace(cfg.loss, kl_coef=0.0))
        if cfg.threads == 0:  # auto: all cores when nothing else computes while the learner does
            alone = st.type == "sft" or self.cfg.algo.max_staleness == 0
            cfg = replace(cfg, threads=-1 if alone and cfg.num_actors == 1 and cfg.gpus_per_actor == 0 else 0)
        return cfg

    def _save(self, learners: LearnerGroup, tag: str) -> str:
        path = os.path.abspath(os.path.join(self.run_dir, "checkpoints", tag))
        learners.save_hf(path)
        return path

    def sft_stage(self, st: StageConfig, model_path: str) -> str:
        from tqdm import tqdm

        learners = LearnerGroup(model_path, self._learner_cfg(st), 1.0, self.cfg.run.learner_cpus,
                                self.cfg.run.timeout_s)
        tok = _tokenizer(model_path)
        samples = []  # rendered and tokenized once; steps draw from them
        for r in self.data("sft", "train"):
            if r.solution:
                p = render(self.cfg.rollout.template, r.question)
                resp = encode_target(tok, r.solution)
                samples.append(Sample(prompt_id=r.id, group_index=0, prompt=p, response=r.solution,
                                      prompt_ids=encode_prompt(tok, p),
                                      response_ids=resp, response_logprobs=[0.0] * len(resp),
                                      weight_version=-1, answer=r.answer))
        if not samples:
            raise ValueError("SFT stage: the sft data has no 'solution' column to train on")
        pool = cycle(samples, self.cfg.run.seed)
        bar = tqdm(range(st.steps), desc=f"{st.name}", dynamic_ncols=True)
        for step in bar:
            with self.timer("data"):
                batch = [next(pool) for _ in range(st.batch_size)]
            with self.timer("train"):
                stats = learners.train_sft(to_arrow(batch))
            self.global_step += 1
            row = {"stage": st.name, "step": step + 1, **stats, **self.timer.pop()}
            self.logger.metrics(row, self.global_step)
            if "sft_loss" in stats:  # absent on pipeline stages that hold no output layer
                bar.set_postfix(loss=f"{stats['sft_loss']:.3f}")
        out = self._save(learners, st.name)
        learners.shutdown()
        return out

    def grpo_stage(self, st: StageConfig, model_path: str) -> str:
        from tqdm import tqdm

        cfg, rc = self.cfg, self.cfg.rollout
        tok = _tokenizer(model_path)  # prompts that can never fit fail here, before any actor starts
        train_set, _ = fit_prompts(self.data("train", "train"), tok, rc.template, rc.max_model_len,
                                   rc.max_tokens, "data.train")
        test, _ = fit_prompts(self.data("test", "test")[:cfg.eval.num_prompts], tok, rc.template,
                              rc.max_model_len, rc.max_tokens, "data.test")
        # the engines load (the slowest start) while the learner loads
        rollouts = RolloutPool(model_path, replace(rc, seed=rc.seed + cfg.run.seed), cfg.run.rollout_cpus,
                               wait=False)
        try:
            learners = LearnerGroup(model_path, self._learner_cfg(st), rc.temperature,
                                    cfg.run.learner_cpus, cfg.run.timeout_s)
            rollouts.wait_ready()
        except BaseException:
            rollouts.shutdown()
            raise
        sync = WeightSync(learners, rollouts, cfg.run.timeout_s)
        stream = RolloutStream(rollouts, self.rewards, cycle(train_set, cfg.run.seed),
                               cfg.algo.prompts_per_step, cfg.algo.max_staleness, cfg.run.timeout_s,
                               total_takes=st.steps)
        version = 0
        self.evaluate(rollouts, test, st.name, 0)
        stream.on_weights_updated(version)
        t_step = time.time()
        bar = tqdm(range(st.steps), desc=st.name, dynamic_ncols=True)
        for step in bar:
            with self.timer("wait_rollout"):
                groups, info = stream.take(version)
            info["learner_version"] = version  # the version these samples are trained at
            with self.timer("advantage"):
                samples, loss_samples, shaping = prepare_step(
                    groups, step + 1, scale_by_std=cfg.learner.loss.scale_adv_by_std,
                    max_tokens=rc.max_tokens, overlong_buffer=cfg.algo.overlong_buffer,
                    overlong_factor=cfg.algo.overlong_penalty, truncated=cfg.algo.truncated,
                    failed_checks=cfg.algo.failed_checks, zero_variance=cfg.algo.zero_variance_groups)
            self.shaping_totals.update(shaping)
            if shaping["zero_variance_groups"] == len(groups):
                log.warning("step %d: all %d groups have equal rewards (advantage 0 everywhere): no "
                            "policy-gradient signal this step%s", step + 1, len(groups),
                            "" if cfg.algo.zero_variance_groups == "drop" else
                            " (algo.zero_variance_groups=drop skips such steps)")
            if loss_samples:
                with self.timer("train"):
                    train = learners.train_grpo(to_arrow(loss_samples))
                with self.timer("sync"):
                    version = train["weight_version"]
                    sync_stats = sync.push(version)
                    stream.on_weights_updated(version)
            else:  # every sample masked: nothing to learn from; the weights stay as they are
                self.shaping_totals["steps_skipped"] += 1
                log.warning("step %d skipped: every sample was masked from the loss (%s)", step + 1,
                            dict(shaping))
                train, sync_stats = {}, {}
            # logging is the controller's own overhead: untimed, it shows in the next step as
            # time_step_s minus the phases above
            self.global_step += 1
            row = self.step_row(st, step + 1, version, samples, train, info, stream, sync_stats)
            row.update({"zero_variance_groups": shaping["zero_variance_groups"],
                        "loss_samples": len(loss_samples),
                        **{f"samples_{k}": v for k, v in shaping.items() if k.startswith("masked_")},
                        "steps_skipped": self.shaping_totals["steps_skipped"]})
            row["time_step_s"] = time.time() - t_step
            t_step = time.time()
            self.logger.metrics(row, self.global_step)
            self.logger.trajectories(st.name, samples)
            bar.write(summary_line(row))
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < st.steps:
                with self.timer("eval"):
                    self.evaluate(rollouts, test, st.name, step + 1)
            if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
                with self.timer("checkpoint"):
                    self._save(learners, f"{st.name}-step{step + 1}")
        left = stream.close()  # counted: generated but not trained on
        self.sample_counts[st.name] = {"generated": stream.counts["generated"],
                                       "trained": stream.counts["trained"],
                                       "reward_retries": stream.counts["reward_retries"],
                                       **dict(stream.dropped), **dict(self.shaping_totals)}
        self.shaping_totals = Counter()
        log.info("stage %s samples: %s (%d left unused at the end)", st.name,
                 self.sample_counts[st.name], left)
        self.evaluate(rollouts, test, st.name, st.steps)
        out = self._save(learners, st.name)
        rollouts.shutdown()
        learners.shutdown()
        return out

    def step_row(self, st, step, version, samples, train, info, stream, sync_stats) -> dict:
        reqs = info["requests"]
        gen_time = sum(r.get("time_generate_s", 0.0) for r in reqs)
        gen_tokens = sum(r.get("gen_tokens", 0) for r in reqs)
        dropped = sum(stream.dropped.values())
        row = {"stage": st.name, "step": step, "weight_version": version,
               **rollout_metrics(samples, info["learner_version"]),
               "kl": train.get("kl", 0.0), "clip_frac": train.get("clip_frac", 0.0),
               "entropy": train.get("entropy", 0.0), "samples_dropped": dropped,
               **{f"samples_{k}": v for k, v in stream.dropped.items()},
               "samples_generated": stream.counts["generated"],
               "samples_trained": stream.counts["trained"],
               "reward_retries": stream.counts["reward_retries"],
               **{k: v for k, v in train.items() if k not in ("kl", "clip_frac", "entropy", "weight_version")},
               **self.timer.pop(),
               "time_generate_s": gen_time,
               "time_reward_s": sum(r.get("time_reward_s", 0.0) for r in reqs),
               "gen_tokens_per_s": gen_tokens / gen_time if gen_time else 0.0,
               "sync_bytes": sync_stats.get("sync_bytes", 0.0)}
        for r in reqs:  # latest cumulative counters of each reward actor, summed below
            if "reward_pool" in r:
                self.reward_counters[r["reward_actor"]] = r["reward_pool"]
        for stats in self.reward_counters.values():
            for k, v in stats.items():
                if isinstance(v, (int, float)):
                    row[f"reward_pool/{k}"] = row.get(f"reward_pool/{k}", 0.0) + v
        row["time_sync_s"] = row.pop("time_sync_s", 0.0)
        row["time_train_s"] = row.pop("time_train_s", 0.0)
        return row

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, rollouts: RolloutPool, test: list[PromptRecord], stage: str, step: int) -> dict:
        """pass@1 averaged over k samples at eval.temperature, and cons@k (majority vote by
        equivalence, :func:`eval_summary`)."""
        if not test:
            return {}
        ec, per = self.cfg.eval, self.cfg.rollout.prompts_per_request
        live = rollouts.live()
        gens, refs = [], []
        for j, i in enumerate(range(0, len(test), per)):
            idx, actor = live[j % len(live)]
            gen = actor.generate.remote(test[i:i + per], ec.k, ec.temperature, ec.top_p)
            gens.append((idx, gen))
            refs.append(self.rewards.async_score(gen)[0])
        t0 = time.time()
        try:
            results = get_all(refs, "evaluation", self.cfg.run.timeout_s)
        except Exception as e:  # name the component that failed: an engine or a reward actor
            raise RuntimeError(f"evaluation of stage {stage} failed: {blame(gens, e)}") from e
        samples = [s for r in results for s in from_arrow(r["batch"])]
        row = {"stage": stage, "step": step, **eval_summary(samples, self.rewards.vote),
               "k": ec.k, "time_s": time.time() - t0}
        self.logger.eval(row, self.global_step)
        self.logger.trajectories(f"eval-{stage}", samples)
        log.info("eval %s step %d: pass@1 %.3f cons@%d %.3f", stage, step, row["accuracy"], ec.k,
                 row["cons_at_k"])
        self.results.setdefault(stage, {})["start" if step == 0 else "end"] = row
        return row


def blame(gens: list[tuple[int, "ray.ObjectRef"]], error: BaseException) -> str:
    """Which engine's generation failed, if one did; else the error is the reward pool's."""
    for idx, gen in gens:
        e = ref_error(gen)
        if e is not None:
            return f"rollout engine {idx}: {type(e).__name__}: {e}"
    return f"reward pool: {type(error).__name__}: {error}"


def eval_summary(samples: list[Sample], vote) -> dict:
    """Evaluation numbers of scored samples (any order; grouped by prompt).

    - ``accuracy``: pass@1 averaged over the k samples of every prompt;
    - ``cons_at_k``: majority vote per prompt, answers clustered by math equivalence
      (``vote(groups) -> [score]``, ``Scorer.vote`` / ``RewardPool.vote``; ties score the mean of
      the tied clusters, see rewards.vote);
    - samples that came back aborted (``finish_reason == 'abort'``: the engine cancelled them) are
      not scored at all and are counted in ``aborted``; ``truncated`` counts those cut at max_tokens.
    """
    from rewards.extract import extract_answer

    aborted = [s for s in samples if s.finish_reason == "abort"]
    kept = [s for s in samples if s.finish_reason != "abort"]
    by_prompt: dict[str, list[Sample]] = {}
    for s in kept:
        by_prompt.setdefault(s.prompt_id, []).append(s)
    n = max(len(kept), 1)
    groups = []
    for group in by_prompt.values():
        group = sorted(group, key=lambda s: s.group_index)
        groups.append(([extract_answer(s.response)[0] for s in group],
                       [s.reward_components.get("accuracy", 0.0) for s in group]))
    cons = vote(groups) if groups else []
    return {"accuracy": sum(s.reward_components.get("accuracy", 0.0) for s in kept) / n,
            "cons_at_k": sum(cons) / len(cons) if cons else 0.0,
            "num_prompts": len(by_prompt), "num_samples": len(kept), "aborted": len(aborted),
            "truncated": sum(s.finish_reason == "length" for s in kept),
            "format": sum(s.reward_components.get("format", 0.0) for s in kept) / n,
            "response_len_mean": sum(len(s.response_ids) for s in kept) / n}


def _tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def start_ray(cfg: JobConfig) -> None:
    """Join ``run.address`` / ``RAY_ADDRESS`` if given, else start a local Ray in-process."""
    if ray.is_initialized():
        return
    address = cfg.run.address or os.environ.get("RAY_ADDRESS") or None
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env)
        return
    need = (cfg.rollout.num_actors * cfg.run.rollout_cpus + cfg.reward.num_actors * cfg.run.reward_cpus
            + cfg.learner.num_actors * cfg.run.learner_cpus)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=cfg.run.dashboard,
             runtime_env=env, log_to_driver=True)
