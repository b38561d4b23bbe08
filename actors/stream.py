"""The asynchronous rollout stream: keeps the engines generating while the learner trains.

Each engine has at most one request in flight (``prompts_per_request`` prompts x G samples); its
result is chained straight into the reward pool (no round trip through the controller), and the
scored groups wait in a buffer until the controller takes a step's worth.

Staleness. A sample made by weights of version ``v`` and trained on at learner version ``t`` has
staleness ``t - v``. ``max_staleness`` bounds it (0 = synchronous, on-policy):
- admission: a request is only started if the step that will consume it (predicted from what is
  already buffered or in flight) is within ``max_staleness`` of the engines' current version, so
  with 0 nothing is generated while the learner trains and with 1 the next batch is generated
  during the current step;
- at ``take`` any sample past the bound is dropped and counted (``dropped_stale``), never trained
  on silently. Failed requests (dead engine, crashed reward actor) are counted by reason too.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import Iterator

import ray

from actors.reward import RewardPool
from actors.rollout import RolloutPool
from rollout.datasets import PromptRecord
from rollout.types import Sample, from_arrow

log = logging.getLogger(__name__)


class RolloutStream:
    def __init__(self, rollouts: RolloutPool, rewards: RewardPool, prompts: Iterator[PromptRecord],
                 groups_per_step: int, max_staleness: int, timeout_s: float = 900.0):
        self.rollouts, self.rewards, self.prompts = rollouts, rewards, prompts
        self.cfg = rollouts.cfg
        self.groups_per_step, self.max_staleness, self.timeout_s = groups_per_step, max_staleness, timeout_s
        self.engine_version = 0       # version every live engine holds (synced together)
        self.next_consumer = 0        # learner version at the next take()
        self.ready: deque[list[Sample]] = deque()  # scored groups, oldest first
        self.inflight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (engine, n_groups)
        self.dropped: Counter = Counter()
        self.gen_stats: list[dict] = []

    # ---- admission -------------------------------------------------------------------------
    def _queued_groups(self) -> int:
        return len(self.ready) + sum(n for _, n in self.inflight.values())

    def fill(self) -> None:
        """Start a request on every idle engine whose samples would be usable (see module doc)."""
        busy = {e for e, _ in self.inflight.values()}
        for idx, actor in self.rollouts.live():
            if idx in busy:
                continue
            consume_at = self.next_consumer + self._queued_groups() // self.groups_per_step
            if consume_at - self.engine_version > self.max_staleness:
                return
            records = [next(self.prompts) for _ in range(self.cfg.prompts_per_request)]
            gen = actor.generate.remote(records)
            ref = self.rewards.async_score(gen)
            self.inflight[ref] = (idx, len(records))

    # ---- consumption -----------------------------------------------------------------------
    def _collect(self, timeout: float) -> None:
        refs = list(self.inflight)
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not done:
            engines = sorted(e for e, _ in self.inflight.values())
            raise TimeoutError(f"no rollout finished within {timeout:.0f}s (engines in flight: {engines})")
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # everything else already done
        for ref in done:
            engine, n_groups = self.inflight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self.dropped["dropped_actor_died"] += n_groups * self.cfg.group_size
                log.error("rollout request on engine %d lost (%d samples): %s", engine,
                          n_groups * self.cfg.group_size, e)
                self.rollouts.mark_dead(engine, f"{type(e).__name__}: {e}")
                continue
            except Exception as e:  # noqa: BLE001 - a failed request is counted, logged, skipped
                self.dropped["dropped_request_error"] += n_groups * self.cfg.group_size
                log.error("rollout request on engine %d failed (%d samples dropped): %s", engine,
                          n_groups * self.cfg.group_size, e)
                continue
            self.gen_stats.append(result["stats"])
            samples = from_arrow(result["batch"])
            g = self.cfg.group_size
            for i in range(0, len(samples), g):
                self.ready.append(samples[i:i + g])

    def take(self, learner_version: int) -> tuple[list[list[Sample]], dict]:
        """Block until ``groups_per_step`` fresh groups are ready; return them and stream stats."""
        self.next_consumer = learner_version
        t0 = time.time()
        while True:
            fresh = deque(grp for grp in self.ready
                          if learner_version - grp[0].weight_version <= self.max_staleness)
            self.dropped["dropped_stale"] += sum(len(g) for g in self.ready) - sum(len(g) for g in fresh)
            self.ready = fresh
            if len(self.ready) >= self.groups_per_step:
                break
            self.fill()
            if not self.inflight:
                raise RuntimeError("rollout stream stalled: nothing in flight and not enough samples "
                                   f"(ready={len(self.ready)}, need={self.groups_per_step})")
            self._collect(self.timeout_s)
        groups = [self.ready.popleft() for _ in range(self.groups_per_step)]
        stats, self.gen_stats = self.gen_stats, []
        self.next_consumer = learner_version + 1
        self.fill()  # prefetch while the learner trains (only if the staleness bound allows)
        return groups, {"wait_s": time.time() - t0, "requests": stats}

    def on_weights_updated(self, version: int) -> None:
        self.engine_version = version
        self.fill()

    def drain(self) -> None:
        """Wait for requests in flight (before evaluation or shutdown); keeps their samples."""
        while self.inflight:
            self._collect(self.timeout_s)
