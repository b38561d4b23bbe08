"""One module per stage type. Each exposes ``run(ctl, i, st, job) -> outputs``:

- ``ctl``: the :class:`cluster.controller.Controller` (run directory, logger, reward pool, inputs);
- ``i``, ``st``: the stage's index and :class:`cluster.config.StageConfig`;
- ``job``: the job config with the stage's overrides merged in (``JobConfig.for_stage``), every
  ``{from_stage: NAME}`` already replaced by that stage's output path;
- ``outputs``: ``{"checkpoint": dir}`` (a policy or reward model) and/or ``{"dataset": dir,
  "dataset_dir": dir}``; written through ``ctl.save`` / ``ctl.commit`` so a half-written output
  is never taken for a finished one.
"""
from __future__ import annotations

from cluster.stages import distill, grpo, reject, reward_model, sft

RUNNERS = {"sft": sft.run, "grpo": grpo.run, "rejection_sample": reject.run,
           "reward_model": reward_model.run, "distill": distill.run}
