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
        # the math workers start with the actor (beside the engines' start), not in the first
        # step's scoring (0.35 s of it on the demo)
        self.scorer.warm_up()
        self.index = index

    def ready(self) -> bool:
        return True

    def score_rollout(self, rollout: dict) -> dict:
        """Fill the reward fields of a rollout result (``{"batch": Arrow, "stats": {...}}``)."""
        t0 = time.time()
        samples = from_arrow(rollout["batch"])
        results = self.scorer.score_batch([
            RewardInput(response=s.response, answer=s.answer, task=s.task, prompt=s.prompt,
                        tests=s.meta.get("tests"),
                        meta={"finish_reason": s.finish_reason, "reward_weights": s.meta.get("reward_weights")})
            for s in samples])
        for s, r in zip(samples, results):
            s.reward, s.reward_components, s.reward_reason = r.score, dict(r.components), r.reason
            if r.metrics:
                s.meta["reward_metrics"] = dict(r.metrics)
        # the pool's cumulative counters ride along, so the controller never blocks asking for them
        stats = dict(rollout["stats"], time_reward_s=time.time() - t0,
                     reward_actor=self.index, reward_pool=self.scorer.stats())
        return {"batch": to_arrow(samples), "stats": stats}

    def vote(self, groups: list) -> list[float]:
        """cons@k of each ``(answers, correctness)`` group (``Scorer.vote``)."""
        return self.scorer.vote([(list(a), list(c)) for a, c in groups])

    def shutdown(self) -> None:
        self.scorer.close()


class RewardPool:
    """``cfg.num_actors`` stateless reward actors, used round-robin. A dead one is replaced
    (:meth:`restart`); its lost batch is the caller's to resubmit (the stream retries it once)."""

    def __init__(self, cfg: RewardConfig, num_cpus: float = 1.0, start_timeout_s: float = 300.0,
                 resources: dict | None = None, wait: bool = True):
        """``wait=False`` returns while the actors start (they start beside the engines and the
        learner); :meth:`wait_ready` waits for them, as does every call that needs them."""
        self.cfg, self.num_cpus, self.timeout_s = cfg, num_cpus, start_timeout_s
        self.resources = dict(resources or {})
        self.started: dict[int, float] = {}  # index -> time.monotonic() its actor was started
        self.actors = [self._start(i) for i in range(cfg.num_actors)]
        self._starting = [a.ready.remote() for a in self.actors]
        self._rr = itertools.cycle(range(len(self.actors)))
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait (within the start timeout) until the actors started by the constructor are up; an
        actor that cannot start raises here, with its error."""
        if self._starting:
            starting, self._starting = self._starting, None
            get_all(starting, "reward actor start", self.timeout_s)

    def _start(self, index: int):
        self.started[index] = time.monotonic()
        return RewardActor.options(num_cpus=self.num_cpus, resources=self.resources).remote(self.cfg, index)

    def async_score(self, rollout_ref) -> tuple["ray.ObjectRef", int]:
        """Chain scoring onto a pending rollout result; returns ``(scored ref, reward actor index)``
        at once."""
        self.wait_ready()
        i = next(self._rr)
        return self.actors[i].score_rollout.remote(rollout_ref), i

    def restart(self, index: int, why: str, sent_at: float | None = None) -> None:
        """Replace reward actor ``index`` (stateless: nothing to restore) and wait until it is up.
        ``sent_at``: ``time.monotonic()`` when the failed call was sent; an actor started since
        is a replacement already (several calls were queued on the dead one) and is kept: each
        late failure replacing the fresh actor again killed the retry running on it."""
        self.wait_ready()
        if index >= len(self.actors):
            return  # scaled away; its batch is scored again by another actor
        if sent_at is not None and self.started.get(index, 0.0) > sent_at:
            return
        log.error("reward actor %d died (%s); starting a replacement", index, why)
        try:
            ray.kill(self.actors[index])
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.actors[index] = self._start(index)
        get_all([self.actors[index].ready.remote()], f"reward actor {index} restart", self.timeout_s)

    def scale_to(self, n: int) -> dict:
        """Grow or shrink the pool to ``n`` actors. A removed actor finishes the batches already
        queued on it, then exits (Ray runs an actor's calls in order)."""
        if n < 1:
            raise ValueError(f"reward pool size must be >= 1, got {n}")
        self.wait_ready()
        have = len(self.actors)
        if n > have:
            new = [self._start(i) for i in range(have, n)]
            try:  # bounded: a pool the cluster cannot place must not hold the training loop
                get_all([a.ready.remote() for a in new], "reward actor start", min(self.timeout_s, 120))
            except Exception as e:  # noqa: BLE001 - refused, the pool stays as it was
                for a in new:
                    ray.kill(a)
                raise RuntimeError(f"could not start {n - have} more reward actor(s) (no room on the "
                                   f"cluster?): {type(e).__name__}: {str(e)[:500]}") from None
            self.actors += new
        for a in self.actors[n:]:
            a.shutdown.remote()
            a.__ray_terminate__.remote()
        self.actors = self.actors[:n]
        self._rr = itertools.cycle(range(n))
        return {"started": list(range(have, n)), "stopped": list(range(n, have))}

    def vote(self, groups: list) -> list[float]:
        """cons@k of each ``(answers, correctness)`` group, on one reward actor (its killable
        math-verify workers), within the pool's timeout."""
        self.wait_ready()
        actor = self.actors[next(self._rr)]
        return get_all([actor.vote.remote(groups)], "cons@k vote", self.timeout_s)[0]

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - teardown
                pass
