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
import torch

from actors.common import get_all
from actors.learner import LearnerGroup
from actors.reward import RewardPool
from actors.rollout import RolloutPool
from actors.stream import RolloutStream
from actors.weight_sync import WeightSync
from cluster.config import JobConfig, StageConfig
from cluster.metrics import PhaseTimer, RunLogger, summary_line
from learner.losses import group_advantages
from rollout.datasets import PromptRecord, arithmetic, load_prompts
from rollout.templates import render
from rollout.types import Sample, from_arrow, to_arrow

log = logging.getLogger(__name__)


def cycle(records: list, seed: int) -> Iterator:
    rng, order = random.Random(seed), list(records)
    while True:
        rng.shuffle(order)
        yield from order


def assign_advantages(groups: list[list[Sample]], scale_by_std: bool, step: int) -> list[Sample]:
    flat = [s for g in groups for s in g]
    adv = group_advantages(torch.tensor([s.reward for s in flat]), len(groups[0]), scale_by_std)
    for s, a in zip(flat, adv.tolist()):
        s.advantage, s.step = a, step
    return flat


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
        self.run_dir = os.path.join(cfg.run.root, cfg.run.name)
        os.makedirs(self.run_dir, exist_ok=True)
        self.logger = RunLogger(self.run_dir, cfg.run.tensorboard)
        self.timer = PhaseTimer()
        self.global_step = 0
        self.dropped_total = 0
        self.results: dict[str, dict] = {}
        self.reward_counters: dict[int, dict] = {}

    # ---- setup ------------------------------------------------------------------------------
    def model_path(self) -> str:
        if self.cfg.model.path != "tiny":
            return self.cfg.model.path
        from rollout.tiny import create_tiny_model
        return create_tiny_model(os.path.join(self.run_dir, "tiny-model"),
                                 **{"seed": self.cfg.run.seed, **self.cfg.model.tiny})

    def data(self, key: str, split: str) -> list[PromptRecord]:
        src = getattr(self.cfg.data, key)
        if src == "arithmetic":
            return arithmetic(split, seed=self.cfg.data.seed + self.cfg.run.seed, max_operand=self.cfg.data.max_operand,
                              heldout_fraction=self.cfg.data.heldout_fraction)
        records, skipped = load_prompts(src)
        if skipped:
            log.warning("data.%s: %s", key, skipped)
        return records

    # ---- the job ----------------------------------------------------------------------------
    def run(self) -> dict[str, dict]:
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
        return replace(self.cfg.learner, lr=st.lr or self.cfg.learner.lr,
                       seed=self.cfg.learner.seed + self.cfg.run.seed)

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
                resp = tok(r.solution, add_special_tokens=False)["input_ids"]
                samples.append(Sample(prompt_id=r.id, group_index=0, prompt=p, response=r.solution,
                                      prompt_ids=tok(p, add_special_tokens=False)["input_ids"],
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
        learners = LearnerGroup(model_path, self._learner_cfg(st), rc.temperature,
                                cfg.run.learner_cpus, cfg.run.timeout_s)
        rollouts = RolloutPool(model_path, replace(rc, seed=rc.seed + cfg.run.seed), cfg.run.rollout_cpus)
        sync = WeightSync(learners, rollouts, cfg.run.timeout_s)
        stream = RolloutStream(rollouts, self.rewards, cycle(self.data("train", "train"), cfg.run.seed),
                               cfg.algo.prompts_per_step, cfg.algo.max_staleness, cfg.run.timeout_s)
        test = self.data("test", "test")[:cfg.eval.num_prompts]
        version = 0
        self.evaluate(rollouts, test, st.name, 0)
        stream.on_weights_updated(version)
        t_step = time.time()
        bar = tqdm(range(st.steps), desc=st.name, dynamic_ncols=True)
        for step in bar:
            with self.timer("wait_rollout"):
                groups, info = stream.take(version)
            with self.timer("advantage"):
                samples = assign_advantages(groups, cfg.learner.loss.scale_adv_by_std, step + 1)
            with self.timer("train"):
                train = learners.train_grpo(to_arrow(samples))
            with self.timer("sync"):
                version = train["weight_version"]
                sync_stats = sync.push(version)
                stream.on_weights_updated(version)
            # logging is the controller's own overhead: untimed, it shows in the next step as
            # time_step_s minus the phases above
            self.global_step += 1
            row = self.step_row(st, step + 1, version, samples, train, info, stream, sync_stats)
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
        stream.drain()
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
               **rollout_metrics(samples, version - 1),
               "kl": train.get("kl", 0.0), "clip_frac": train.get("clip_frac", 0.0),
               "entropy": train.get("entropy", 0.0), "samples_dropped": dropped,
               **{f"samples_{k}": v for k, v in stream.dropped.items()},
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
        """pass@1 averaged over k samples at eval.temperature, and cons@k (majority vote)."""
        from rewards.extract import extract_answer

        if not test:
            return {}
        ec, per = self.cfg.eval, self.cfg.rollout.prompts_per_request
        live = rollouts.live()
        refs = []
        for j, i in enumerate(range(0, len(test), per)):
            _, actor = live[j % len(live)]
            gen = actor.generate.remote(test[i:i + per], ec.k, ec.temperature)
            refs.append(self.rewards.async_score(gen))
        t0 = time.time()
        results = get_all(refs, "evaluation", self.cfg.run.timeout_s)
        samples = [s for r in results for s in from_arrow(r["batch"])]
        by_prompt: dict[str, list[Sample]] = {}
        for s in samples:
            by_prompt.setdefault(s.prompt_id, []).append(s)
        acc = [s.reward_components.get("accuracy", 0.0) for s in samples]
        cons = []
        for group in by_prompt.values():
            votes: dict[str, list[float]] = {}
            for s in group:
                ans, _ = extract_answer(s.response)
                if ans is not None:
                    votes.setdefault(ans.strip(), []).append(s.reward_components.get("accuracy", 0.0))
            cons.append(max(votes.values(), key=len)[0] if votes else 0.0)
        row = {"stage": stage, "step": step, "accuracy": sum(acc) / len(acc),
               "cons_at_k": sum(cons) / len(cons), "k": ec.k, "num_prompts": len(by_prompt),
               "format": sum(s.reward_components.get("format", 0.0) for s in samples) / len(samples),
               "response_len_mean": sum(len(s.response_ids) for s in samples) / len(samples),
               "time_s": time.time() - t0}
        self.logger.eval(row, self.global_step)
        self.logger.trajectories(f"eval-{stage}", samples)
        log.info("eval %s step %d: pass@1 %.3f cons@%d %.3f", stage, step, row["accuracy"], ec.k,
                 row["cons_at_k"])
        self.results.setdefault(stage, {})["start" if step == 0 else "end"] = row
        return row


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
