"""From scored groups to the samples a GRPO step trains on: reward shaping, advantages, masking.

Pure functions over :class:`rollout.types.Sample` (no Ray, no model), in the order a step applies
them (``prepare_step``):

1. **Soft overlong penalty** (DAPO, Yu et al. 2025), off by default: a response whose length is in
   the last ``overlong_buffer`` tokens before ``max_tokens`` gets a reward penalty growing linearly
   from 0 to ``-overlong_penalty`` (component ``overlong``).
2. **Failed checks**: a sample whose verification timed out or crashed (the verifier's fault or an
   input it could not decide, not a wrong answer) has an unknown reward. With ``failed_checks:
   mask`` (default) it takes no part in its group's mean / std and gets no loss; ``zero`` trains
   on it as reward 0 (the old behaviour).
3. **Group advantages** over the remaining samples of each group (learner.losses.group_advantages:
   float64, exact zeros for equal rewards).
4. **Truncated responses** (cut at ``max_tokens``): with ``truncated: mask`` (default, DAPO's
   overlong filtering) they count in their group's statistics but get no loss, so a long answer
   is not punished for being unfinished nor rewarded for a ``\\boxed{}`` in its reasoning;
   ``keep`` trains on them.
5. **Zero-variance groups** (every reward equal: advantage 0): ``keep`` (default, as the paper)
   or ``drop`` (DAPO-style dynamic sampling's filter: they only dilute the batch).
Every sample masked out is counted by reason; none is dropped silently, and every taken sample is
still written to the trajectories (``meta["loss_masked"]`` names why it got no loss).
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from learner.losses import group_advantages, zero_variance_groups
from rollout.types import Sample

_FAILED_KINDS = ("timeout", "crash", "worker_start_failed", "verifier_error")
_TEST_COUNT = re.compile(r"\(\d+/\d+ passed\)")


def is_failed_check(reason: str) -> bool:
    """True when the reward reason says verification itself failed (a math check that timed out
    or crashed its worker, a verifier exception), not that the answer or program was wrong. A code
    test that timed out (``timeout (0/3 passed): ...``) is the program's failure: a real 0."""
    if not reason or _TEST_COUNT.search(reason):
        return False
    kind = reason.split(":")[0].split(" (")[0].strip()
    return kind in _FAILED_KINDS


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to ``max_tokens - buffer``, then linear to ``-factor``
    at ``max_tokens``.

    >>> overlong_penalty(10, 20, 4), overlong_penalty(18, 20, 4), overlong_penalty(20, 20, 4)
    (0.0, -0.5, -1.0)
    """
    if buffer <= 0:
        return 0.0
    start = max_tokens - buffer
    if length <= start:
        return 0.0
    return -factor * min(length - start, buffer) / buffer


def prepare_step(groups: list[list[Sample]], step: int, *, scale_by_std: bool = True,
                 max_tokens: int = 0, overlong_buffer: int = 0, overlong_factor: float = 1.0,
                 truncated: str = "mask", failed_checks: str = "mask",
                 zero_variance: str = "keep") -> tuple[list[Sample], list[Sample], Counter]:
    """Shape rewards, assign advantages, and choose the loss samples of one step.

    Returns ``(taken, train, counts)``: every sample of the step (advantage and step set, for the
    trajectories and metrics), the subset that gets a loss, and ``counts`` with ``masked_<reason>``
    per masked sample and ``zero_variance_groups``.
    """
    counts: Counter = Counter()
    taken: list[Sample] = []
    train: list[Sample] = []
    for group in groups:
        for s in group:
            s.step, s.advantage = step, 0.0
            s.meta.pop("loss_masked", None)
            pen = overlong_penalty(len(s.response_ids), max_tokens, overlong_buffer, overlong_factor)
            if overlong_buffer > 0:
                s.reward_components["overlong"] = pen
                s.reward = s.reward + pen
        known = [s for s in group
                 if not (failed_checks == "mask" and is_failed_check(s.reward_reason))]
        known_ids = {id(s) for s in known}
        for s in group:
            if id(s) not in known_ids:
                s.meta["loss_masked"] = "failed_check"
        rewards = torch.tensor([s.reward for s in known], dtype=torch.float64)
        zero_var = len(known) < 2 or zero_variance_groups(rewards, len(known)) == 1
        if not zero_var:
            for s, a in zip(known, group_advantages(rewards, len(known), scale_by_std).tolist()):
                s.advantage = a
        if zero_var:
            counts["zero_variance_groups"] += 1
        for s in group:
            taken.append(s)
            if "loss_masked" not in s.meta and truncated == "mask" and s.finish_reason == "length":
                s.meta["loss_masked"] = "truncated"
            if "loss_masked" not in s.meta and zero_var and zero_variance == "drop":
                s.meta["loss_masked"] = "zero_variance"
            if "loss_masked" in s.meta:
                counts[f"masked_{s.meta['loss_masked']}"] += 1
            else:
                train.append(s)
    return taken, train, counts
