"""``distill``: R1's distillation into a smaller student. The stage's input checkpoint is the
teacher: it generates ``samples_per_prompt`` traces per prompt of ``data.train``, the reward pool
scores them and the rejection filter (``filters``) drops the wrong ones (the dataset lands under
``runs/<name>/datasets/<stage>/`` like a rejection_sample stage's); then the **student** (``student``:
another, usually smaller, model, possibly with another tokenizer: the traces are re-tokenized from
their text) is SFT'd on the kept traces for ``steps`` steps and evaluated. Its checkpoint is the
stage's output.
"""
from __future__ import annotations

from cluster.stages import reject, sft


def run(ctl, i, st, job) -> dict:
    from cluster.config import ModelConfig, _build
    from rollout.datasets import load_prompts

    data = reject.write_dataset(ctl, i, st, job)
    student = ctl.base_model(_build(ModelConfig, st.student, f"stages.{i}.student"), f"student-{st.name}")
    records, _ = load_prompts(data["dataset"])
    return {"checkpoint": sft.train(ctl, i, st, job, student, records), **data}
