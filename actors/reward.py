"""Reward actors: CPU actors around ``rewards.build_scorer``, and the pool that spreads batches."""
from __future__ import annotations

import itertools
import logging
import time

import ray

from actors.common import get_all
from rewards.config import RewardConfig
from rewards.types import RewardInput
from rollout.types import from_arrow, to_arrow

log = logging.getLogger(__name__)


@ray.remote
class RewardActor:
    def __init__(self, cfg: RewardConfig, index: int = 0):
        from rewards import build_scorer

        logging.basicConfig(level=logging.INFO)
        self.scorer = build_scorer(cfg)
        self.index = index

    def ready(self) -> bool:
        return True

    def score_rollout(self, rollout: dict) -> dict:
        """Fill the reward fields of a rollout result (``{"batch": Arrow, "stats": {...}}``)."""
        t0 = time.time()
        samples = from_arrow(rollout["batch"])
        results = self.scorer.score_batch([
            RewardInput(response=s.response, answer=s.answer, task=s.task, prompt=s.prompt,
                        tests=s.meta.get("tests"), meta={"finish_reason": s.finish_reason})
            for s in samples])
        for s, r in zip(samples, results):
            s.reward, s.reward_components, s.reward_reason = r.score, dict(r.components), r.reason
            if r.metrics:
                s.meta["reward_metrics"] = dict(r.metrics)
        # the pool's cumulative counters ride along, so the controller never blocks asking for them
        stats = dict(rollout["stats"], time_reward_s=time.time() - t0,
                     reward_actor=self.index, reward_pool=self.scorer.stats())
        return {"batch": to_arrow(samples), "stats": stats}

    def shutdown(self) -> None:
        self.scorer.close()


class RewardPool:
    def __init__(self, cfg: RewardConfig, num_cpus: float = 1.0, start_timeout_s: float = 300.0):
        self.actors = [RewardActor.options(num_cpus=num_cpus).remote(cfg, i) for i in range(cfg.num_actors)]
        get_all([a.ready.remote() for a in self.actors], "reward actor start", start_timeout_s)
        self._rr = itertools.cycle(range(len(self.actors)))

    def async_score(self, rollout_ref) -> "ray.ObjectRef":
        """Chain scoring onto a pending rollout result; returns the scored result's ref at once."""
        return self.actors[next(self._rr)].score_rollout.remote(rollout_ref)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - teardown
                pass
