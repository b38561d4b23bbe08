"""``rejection_sample``: R1's filter-then-SFT data step. From the stage's input checkpoint, the
rollout pool generates ``samples_per_prompt`` completions of every prompt of ``data.train``, the
reward pool scores them, and :func:`filter_samples` keeps the verified ones (``filters``). The
kept samples are a dataset (``runs/<name>/datasets/<stage>/kept/``, one row per sample with
``question``, ``answer`` and the response as ``solution``: what an ``sft`` stage reads through
``data.sft: {from_stage: <stage>}``); the rejected ones, with the filter that rejected them, are
in ``rejected/`` (a ``reward_model`` stage pairs them with kept answers to the same prompt).

Not to be confused with what some RL libraries call "rejection sampling": masking tokens by their
importance ratio during the policy update. This is a data step between RL and SFT.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import replace

from cluster.config import FilterConfig
from cluster.pipeline import tmp_path
from rollout.types import Sample

log = logging.getLogger(__name__)

REASONS = ("aborted", "truncated", "accuracy", "format", "language", "length", "duplicate",
           "per_prompt_cap")
"""Filters in the order they are applied; a rejected sample is counted under the first it fails."""


def filter_samples(samples: list[Sample], f: FilterConfig, language: str = "en"
                   ) -> tuple[list[Sample], list[tuple[Sample, str]]]:
    """``(kept, [(rejected sample, reason)])``, both in input order (pure; see REASONS)."""
    from rewards.format import format_score
    from rewards.language import chain_of_thought, language_share

    kept, rejected = [], []
    seen: dict[str, set[str]] = {}
    for s in samples:
        text = " ".join(s.response.split()).casefold()
        n = len(s.response_ids)
        if s.finish_reason == "abort":
            why = "aborted"
        elif s.finish_reason == "length":
            why = "truncated"
        elif s.reward_components.get("accuracy", 0.0) < f.accuracy_min:
            why = "accuracy"
        elif f.format and format_score(s.response)[0] < 1.0:
            why = "format"
        elif f.language_min > 0 and language_share(chain_of_thought(s.response), language)[0] < f.language_min:
            why = "language"
        elif n < f.min_tokens or (f.max_tokens and n > f.max_tokens):
            why = "length"
        elif f.dedupe and text in seen.get(s.prompt_id, ()):
            why = "duplicate"
        elif f.max_per_prompt and len(seen.get(s.prompt_id, ())) >= f.max_per_prompt:
            why = "per_prompt_cap"
        else:
            seen.setdefault(s.prompt_id, set()).add(text)
            kept.append(s)
            continue
        rejected.append((s, why))
    return kept, rejected


def run(ctl, i, st, job) -> dict:
    return write_dataset(ctl, i, st, job)


def write_dataset(ctl, i, st, job) -> dict:
    """Sample from the stage's input checkpoint into ``datasets/<stage>/`` (written under a
    temporary name, then committed); the summary goes to the stage's results. Returns the
    ``dataset`` (kept) and ``dataset_dir`` outputs."""
    final = ctl.dataset_dir(st.name)
    summary = sample_dataset(ctl, i, st, job, ctl.input_model(i, st), tmp_path(final))
    ctl.commit(i, tmp_path(final), final)
    ctl.results.setdefault(st.name, {})["rejection"] = summary
    return {"dataset": os.path.join(final, "kept"), "dataset_dir": final}


def sample_dataset(ctl, i, st, job, model_path: str, out: str) -> dict:
    """Generate, score, filter and write ``out/{kept,rejected}/part-00000.parquet`` and
    ``out/summary.json``; returns the summary row. Raises when nothing is kept, naming the filter
    that rejected the most."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actors.rollout import RolloutPool
    from cluster.controller import tokenizer
    from cluster.evaluation import generate_scored
    from rollout.datasets import fit_prompts

    rc = job.rollout
    tok = tokenizer(model_path)
    records, _ = fit_prompts(ctl.train_records(job), tok,
                             rc.template, rc.max_model_len, rc.max_tokens, "data.train")
    if st.num_prompts:
        records = records[:st.num_prompts]
    by_id = {r.id: r for r in records}
    rollouts = RolloutPool(model_path, replace(rc, seed=rc.seed + job.run.seed), job.run.rollout_cpus,
                           resources=job.run.rollout_resources)
    try:
        with ctl.timer("generate"):
            samples = generate_scored(rollouts, ctl.rewards, records, st.samples_per_prompt,
                                      rc.temperature, rc.top_p, rc.prompts_per_request,
                                      job.run.timeout_s, f"stage {st.name} sampling")
    finally:
        rollouts.shutdown()
    kept, rejected = filter_samples(samples, st.filters, job.reward.language)
    reasons = Counter(why for _, why in rejected)
    summary = {"prompts": len(records), "samples": len(samples), "kept": len(kept),
               "prompts_with_kept": len({s.prompt_id for s in kept}),
               **{f"rejected_{r}": reasons.get(r, 0) for r in REASONS}}

    def rows(items):
        out_rows = []
        for s, why in items:
            r = by_id[s.prompt_id]
            out_rows.append({"id": f"{s.prompt_id}#{s.group_index}", "prompt_id": s.prompt_id,
                             "question": r.question, "answer": r.answer, "task": r.task,
                             "solution": s.response, "prompt": s.prompt, "reward": s.reward,
                             "accuracy": s.reward_components.get("accuracy", 0.0),
                             "format": s.reward_components.get("format", 0.0),
                             "response_tokens": len(s.response_ids), "finish_reason": s.finish_reason,
                             "reject_reason": why, "source_stage": st.name, "model": model_path})
        return out_rows

    for name, items in (("kept", [(s, "") for s in kept]), ("rejected", rejected)):
        os.makedirs(os.path.join(out, name), exist_ok=True)
        table = pa.Table.from_pylist(rows(items)) if items else pa.table({"id": pa.array([], pa.string())})
        pq.write_table(table, os.path.join(out, name, "part-00000.parquet"))
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    if not kept:
        top = reasons.most_common(1)[0] if reasons else ("none", 0)
        raise ValueError(f"stage {st.name} kept 0 of {len(samples)} samples: rejected by "
                         f"{dict(reasons)}; most by the '{top[0]}' filter (stages.{i}.filters"
                         f"{'' if top[0] in ('aborted', 'truncated', 'duplicate') else '.' + _filter_key(top[0])}"
                         "); loosen it, sample more (samples_per_prompt) or train the input model longer; "
                         f"the rejected samples are in {os.path.join(out, 'rejected')}")
    ctl.logger.metrics({"stage": st.name, "step": 0, **{f"rs_{k}": v for k, v in summary.items()},
                        **ctl.timer.pop()}, ctl.global_step)
    log.info("stage %s kept %d of %d samples (%d of %d prompts): %s", st.name, len(kept),
             len(samples), summary["prompts_with_kept"], len(records), dict(reasons))
    return summary


def _filter_key(reason: str) -> str:
    return {"accuracy": "accuracy_min", "format": "format", "language": "language_min",
            "length": "min_tokens / max_tokens", "per_prompt_cap": "max_per_prompt"}.get(reason, reason)
