"""Generation for evaluation and rejection sampling, and the one evaluation routine every stage uses.

- :func:`generate_scored`: k completions per record from the live engines, chained into the reward
  pool (generation of one chunk overlaps scoring of the previous), within ``run.timeout_s``.
- :func:`evaluate`: held-out pass@1 averaged over k samples and cons@k, plus mean response length,
  reflection words and language consistency; one row in ``eval.jsonl``.
- :func:`eval_summary`: those numbers from scored samples (pure; unit-tested).
"""
from __future__ import annotations

import logging
import time

import ray

from actors.common import get_all, ref_error
from rollout.datasets import PromptRecord
from rollout.types import Sample, from_arrow

log = logging.getLogger(__name__)


def generate_scored(rollouts, rewards, records: list[PromptRecord], n: int, temperature: float,
                    top_p: float, per_request: int, timeout_s: float, what: str) -> list[Sample]:
    """``n`` scored completions of every record, spread round-robin over the live engines."""
    live = rollouts.live()
    gens, refs = [], []
    for j, i in enumerate(range(0, len(records), per_request)):
        idx, actor = live[j % len(live)]
        gen = actor.generate.remote(records[i:i + per_request], n, temperature, top_p)
        gens.append((idx, gen))
        refs.append(rewards.async_score(gen)[0])
    try:
        results = get_all(refs, what, timeout_s)
    except Exception as e:  # name the component that failed: an engine or a reward actor
        raise RuntimeError(f"{what} failed: {blame(gens, e)}") from e
    return [s for r in results for s in from_arrow(r["batch"])]


def evaluate(ctl, rollouts, test: list[PromptRecord], job, stage: str, step: int) -> dict:
    """Held-out evaluation of the engines' current weights; logs and returns the row."""
    if not test:
        return {}
    ec = job.eval
    t0 = time.time()
    samples = generate_scored(rollouts, ctl.rewards, test, ec.k, ec.temperature, ec.top_p,
                              job.rollout.prompts_per_request, job.run.timeout_s,
                              f"evaluation of stage {stage}")
    row = {"stage": stage, "step": step, **eval_summary(samples, ctl.rewards.vote, job.reward.language),
           "k": ec.k, "time_s": time.time() - t0}
    ctl.logger.eval(row, ctl.global_step)
    ctl.logger.trajectories(f"eval-{stage}", samples)
    log.info("eval %s step %d: pass@1 %.3f cons@%d %.3f", stage, step, row["accuracy"], ec.k,
             row["cons_at_k"])
    return row


def blame(gens: list[tuple[int, "ray.ObjectRef"]], error: BaseException) -> str:
    """Which engine's generation failed, if one did; else the error is the reward pool's."""
    for idx, gen in gens:
        e = ref_error(gen)
        if e is not None:
            return f"rollout engine {idx}: {type(e).__name__}: {e}"
    return f"reward pool: {type(error).__name__}: {error}"


def eval_summary(samples: list[Sample], vote, language: str = "en") -> dict:
    """Evaluation numbers of scored samples (any order; grouped by prompt).

    - ``accuracy``: pass@1 averaged over the k samples of every prompt;
    - ``cons_at_k``: majority vote per prompt, answers clustered by math equivalence
      (``vote(groups) -> [score]``, ``Scorer.vote`` / ``RewardPool.vote``; ties score the mean of
      the tied clusters, see rewards.vote);
    - ``reflection_words_mean`` (rewards.reflection) and ``language_mean``: the share of
      chain-of-thought words in ``language`` (rewards.language), over the ``language_n`` responses
      whose chain of thought has words at all (None when none has: ``3+4=7`` is no language);
    - samples that came back aborted (``finish_reason == 'abort'``: the engine cancelled them) are
      not scored at all and are counted in ``aborted``; ``truncated`` counts those cut at max_tokens.
    """
    from rewards.extract import extract_answer
    from rewards.language import chain_of_thought, language_share
    from rewards.reflection import count_reflection_words

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
    shares = [sh for sh, why in (language_share(chain_of_thought(s.response), language) for s in kept)
              if why == "ok"]
    return {"accuracy": sum(s.reward_components.get("accuracy", 0.0) for s in kept) / n,
            "cons_at_k": sum(cons) / len(cons) if cons else 0.0,
            "num_prompts": len(by_prompt), "num_samples": len(kept), "aborted": len(aborted),
            "truncated": sum(s.finish_reason == "length" for s in kept),
            "format": sum(s.reward_components.get("format", 0.0) for s in kept) / n,
            "response_len_mean": sum(len(s.response_ids) for s in kept) / n,
            "reflection_words_mean": sum(count_reflection_words(s.response) for s in kept) / n,
            "language_mean": sum(shares) / len(shares) if shares else None,
            "language_n": len(shares)}
