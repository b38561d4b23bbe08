"""``sft``: supervised fine-tuning on gold completions (R1's cold start, and its stage-3 SFT on
rejection-sampled data). The response is the record's ``solution`` text, tokenized with the
model's own tokenizer (so a student with another tokenizer re-tokenizes a teacher's text)."""
from __future__ import annotations

import logging

from rollout.datasets import PromptRecord
from rollout.templates import encode_prompt, encode_target, render
from rollout.types import Sample, to_arrow

log = logging.getLogger(__name__)


def run(ctl, i, st, job) -> dict:
    records = ctl.records(job.data.sft, "train", job, "data.sft")
    return {"checkpoint": train(ctl, i, st, job, ctl.input_model(i, st), records)}


def sft_samples(records: list[PromptRecord], tok, template: str) -> list[Sample]:
    """The records with a solution, rendered and tokenized once by ``tok`` (the trained model's
    own tokenizer: text in, that model's ids out; no ids from another model are reused)."""
    out = []
    for r in records:
        if r.solution:
            p = render(template, r.question, tok)
            resp = encode_target(tok, r.solution)
            out.append(Sample(prompt_id=r.id, group_index=0, prompt=p, response=r.solution,
                              prompt_ids=encode_prompt(tok, p), response_ids=resp,
                              response_logprobs=[0.0] * len(resp), weight_version=-1, answer=r.answer))
    return out


def train(ctl, i, st, job, model_path: str, records: list[PromptRecord]) -> str:
    """``st.steps`` steps of ``st.batch_size`` sequences from ``records`` (shuffled, cycled);
    saves, evaluates and returns the checkpoint."""
    from tqdm import tqdm

    from actors.learner import LearnerGroup
    from cluster.controller import cycle, tokenizer

    samples = sft_samples(records, tokenizer(model_path), job.rollout.template)
    if not samples:
        raise ValueError(f"stage {st.name}: its data has no 'solution' text to train on")
    learners = LearnerGroup(model_path, ctl.learner_cfg(st, job), 1.0, job.run.learner_cpus,
                            job.run.timeout_s, job.run.learner_resources)
    try:
        pool = cycle(samples, job.run.seed)
        bar = tqdm(range(st.steps), desc=st.name, dynamic_ncols=True)
        for step in bar:
            with ctl.timer("data"):
                batch = [next(pool) for _ in range(st.batch_size)]
            with ctl.timer("train"):
                stats = learners.train_sft(to_arrow(batch))
            ctl.global_step += 1
            ctl.logger.metrics({"stage": st.name, "step": step + 1, **stats, **ctl.timer.pop()},
                               ctl.global_step)
            if "sft_loss" in stats:  # absent on pipeline stages that hold no output layer
                bar.set_postfix(loss=f"{stats['sft_loss']:.3f}")
        out = ctl.save(i, learners, st.name)
    finally:
        learners.shutdown()
    ctl.evaluate_checkpoint(out, st, job)
    return out
