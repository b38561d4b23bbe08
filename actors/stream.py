"""The asynchronous rollout stream: keeps the engines generating while the learner trains.

Each engine has at most one generation in flight (up to ``prompts_per_request`` prompts x G
samples); its result is chained straight into the reward pool (no round trip through the
controller), and the scored groups wait in a buffer until the controller takes a step's worth.
An engine takes its next request as soon as its generation is done, while that batch is still
being scored (and run through the reference): it does not wait for the controller to collect it
(that wait idled the demo's engine ~0.06 s of each asynchronous step).

Staleness. A sample made by weights of version ``v`` and trained on at learner version ``t`` has
staleness ``t - v``. ``max_staleness`` bounds it (0 = synchronous, on-policy):
- admission: the engines' current version ``e`` can feed the steps ``next_consumer ..
  e + max_staleness``; a request is started only for groups those steps still need (``budget``),
  and is cut to that many prompts, so no generated group is bound to go stale. With 0 nothing is
  generated while the learner trains; with 1 the next batch is generated during the current step;
- at ``take`` the groups the next step could no longer use (made by version
  ``learner_version - max_staleness``) go first, then the freshest; any sample past the bound is
  dropped and counted (``dropped_stale``), never trained on silently. Taking only the freshest
  let a newer batch overtake an older one whenever a step started late (after an evaluation, a
  checkpoint, a slow first step): the older one then went stale and was thrown away, and the
  next step waited for a generation of its own.

Failures are told apart by where they happened:
- the engine's generation failed: a dead engine is removed from the pool (``dropped_actor_died``),
  an error in a live one is counted (``dropped_request_error``);
- the engine generated but the reward actor died: the reward actor is restarted (it is stateless)
  and the same generation result is scored again, once (``reward_retries``); a second failure
  drops the batch (``dropped_reward_failed``). The engine is never blamed for it.
A request not done after ``rollout.generate_timeout_s`` (an engine core that died mid-generation
never answers) has its engine killed and removed (``dropped_generate_timeout``).
An engine whose last ``max_consecutive_failures`` requests all failed is removed from the pool
(when it was the last one, the job stops with its last error) instead of being refilled forever;
``4 x`` that many failures in a row across the whole pool stop the job too. A group with a
sample the engine aborted is dropped (``dropped_aborted``). ``generated`` / ``trained`` count
samples; what is left at the end of a stage is counted by :meth:`close` (``dropped_end_of_stage``).
"""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator

import ray

from actors.common import ref_error
from actors.reward import RewardPool
from actors.rollout import RolloutPool
from rollout.datasets import PromptRecord
from rollout.types import Sample, from_arrow

log = logging.getLogger(__name__)


@dataclass
class Request:
    engine: int
    n_groups: int
    gen: "ray.ObjectRef"
    reward_actor: int
    retried: bool = False
    t0: float = 0.0
    """time.monotonic() when the generation was submitted."""
    ref: "ray.ObjectRef | None" = None
    """A reference actor's logprobs of the generation (``learner.reference: pool``), computed
    beside the scoring."""
    generated: bool = False
    """The engine has returned this generation successfully (it may take another request)."""
    done: "ray.ObjectRef | None" = None
    """The generation's sample count (``RolloutActor.generate_for_stream``): ready, or failed,
    with the generation, and small enough to fetch just to see which."""


class RolloutStream:
    def __init__(self, rollouts: RolloutPool, rewards: RewardPool, prompts: Iterator[PromptRecord],
                 groups_per_step: int, max_staleness: int, timeout_s: float = 900.0,
                 max_consecutive_failures: int = 8, total_takes: int | None = None,
                 admit=None, reference=None):
        """``admit``: called when no engine serves but some are starting (a dead engine's
        replacement); it gives them the current weights and puts them in service
        (``WeightSync.admit``). ``reference``: an :class:`actors.reference.ReferencePool`
        (``learner.reference: pool``) that adds the KL reference's logprobs to every sample."""
        self.rollouts, self.rewards, self.prompts = rollouts, rewards, prompts
        self.reference = reference
        self.cfg = rollouts.cfg
        self.groups_per_step, self.max_staleness, self.timeout_s = groups_per_step, max_staleness, timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self.admit = admit
        self.total_takes = total_takes  # the stage's steps: nothing is generated past the last one
        self.takes = 0
        self.engine_version = 0       # version every live engine holds (synced together)
        self.next_consumer = 0        # learner version at the next take()
        self.ready: deque[list[Sample]] = deque()  # scored groups
        self.inflight: dict[ray.ObjectRef, Request] = {}
        self.dropped: Counter = Counter()
        self.counts: Counter = Counter()  # generated, trained, reward_retries
        # each buffered group's request stats, in a box its groups share: take() empties it with
        # the step that trains on the request's first group (a request collected during an
        # earlier step, while its engine ran ahead, still shows in the step that uses it)
        self._origin: dict[int, list[dict]] = {}
        self._failures_in_a_row = 0   # across the pool
        self._engine_failures: Counter = Counter()  # per engine, reset by its next success

    # ---- admission -------------------------------------------------------------------------
    def queued_groups(self) -> int:
        """Groups drawn from the data but not yet taken by the learner (buffered or in flight)."""
        return len(self.ready) + sum(r.n_groups for r in self.inflight.values())

    def budget(self) -> int:
        """Groups that may still be started: what the steps the current weights can feed (within
        the staleness bound) need, less what is buffered or in flight."""
        steps = self.engine_version + self.max_staleness - self.next_consumer + 1
        if self.total_takes is not None:
            steps = min(steps, self.total_takes - self.takes)
        return steps * self.groups_per_step - self.queued_groups()

    def generating(self) -> set[int]:
        """Engines with a generation in flight. A request's engine is free once it has returned
        the generation, while the batch is still scored; one whose generation failed stays taken
        until :meth:`_collect` has dealt with the failure (no request is sent to a dead engine)."""
        pending = [r for r in self.inflight.values() if not r.generated]
        if pending:
            done, _ = ray.wait([r.done for r in pending], num_returns=len(pending), timeout=0,
                               fetch_local=False)
            done = set(done)
            for r in pending:
                r.generated = r.done in done and ref_error(r.done) is None
        return {r.engine for r in self.inflight.values() if not r.generated}

    def fill(self) -> None:
        """Start a request on every idle engine, for as many groups as the budget allows (split
        evenly over the idle engines, at most ``prompts_per_request`` each)."""
        busy = {r.engine for r in self.inflight.values()}
        for idx in sorted(self.rollouts.retiring - busy):  # scaled down: stopped once all done
            self.rollouts.stop(idx)
        if self.budget() <= 0:
            return
        generating = self.generating()
        idle = [(idx, actor) for idx, actor in self.rollouts.live() if idx not in generating]
        for k, (idx, actor) in enumerate(idle):
            budget = self.budget()
            if budget <= 0:
                return
            # spread the budget over the idle engines rather than loading the first one
            n = min(self.cfg.prompts_per_request, -(-budget // (len(idle) - k)))
            records = [next(self.prompts) for _ in range(n)]
            gen, done = actor.generate_for_stream.remote(records)
            # learner.reference: pool: a reference actor runs the KL reference on the generation
            # while a reward actor scores it
            ref_lp = self.reference.submit(gen) if self.reference is not None else None
            ref, reward_actor = self.rewards.async_score(gen)
            self.inflight[ref] = Request(idx, n, gen, reward_actor, t0=time.monotonic(), ref=ref_lp,
                                         done=done)

    # ---- consumption -----------------------------------------------------------------------
    def _failed(self, req: Request, error: BaseException) -> None:
        n = req.n_groups * self.cfg.group_size
        engine_error = ref_error(req.gen)  # None: the engine generated, scoring failed
        if engine_error is not None:
            what = f"{type(engine_error).__name__}: {engine_error}"
            if isinstance(engine_error, ray.exceptions.RayActorError):
                self.dropped["dropped_actor_died"] += n
                log.error("rollout engine %d died (%d samples lost): %s", req.engine, n, engine_error)
                self.rollouts.mark_dead(req.engine, what)
            else:
                self.dropped["dropped_request_error"] += n
                log.error("rollout request on engine %d failed (%d samples dropped): %s",
                          req.engine, n, engine_error)
                self._engine_failures[req.engine] += 1
                k = self._engine_failures[req.engine]
                if k >= self.max_consecutive_failures:
                    self.rollouts.mark_dead(req.engine, f"its last {k} requests in a row failed; "
                                                        f"last: {what[:2000]}")
            self._count_failure(f"rollout engine {req.engine}: {what}")
            return
        # the engine generated; scoring failed
        if isinstance(error, ray.exceptions.RayActorError):
            self.rewards.restart(req.reward_actor, f"{type(error).__name__}", sent_at=req.t0)
        if not req.retried:
            self.counts["reward_retries"] += 1
            log.warning("reward actor %d failed on a batch of engine %d (%s); scoring it again",
                        req.reward_actor, req.engine, type(error).__name__)
            ref, reward_actor = self.rewards.async_score(req.gen)
            self.inflight[ref] = Request(req.engine, req.n_groups, req.gen, reward_actor, retried=True,
                                         t0=time.monotonic(), ref=req.ref, generated=True)
            return
        self.dropped["dropped_reward_failed"] += n
        log.error("scoring a batch of engine %d failed twice (%d samples dropped): %s", req.engine, n, error)
        self._count_failure(f"reward actor {req.reward_actor}: {type(error).__name__}: {error}")

    def _attach_reference(self, req: Request, samples: list[Sample]) -> dict:
        """Put the reference actor's logprobs on the scored samples (same order: the reward actor
        keeps it; checked); waits for them ``rollout.generate_timeout_s`` at most."""
        out = ray.get(req.ref, timeout=self.cfg.generate_timeout_s)
        if out["keys"] != [(s.prompt_id, s.group_index) for s in samples]:
            raise RuntimeError("reference logprobs do not line up with the scored samples")
        for s, lp in zip(samples, out["ref_logprobs"]):
            if len(lp) != len(s.response_ids):
                raise RuntimeError(f"{len(lp)} reference logprobs for {len(s.response_ids)} tokens")
            s.ref_logprobs = lp
        return {"time_ref_s": out["time_ref_s"]}

    def _reference_failed(self, req: Request, error: BaseException) -> None:
        n = req.n_groups * self.cfg.group_size
        what = f"{type(error).__name__}: {error}"
        self.counts["generated"] += n  # generated and scored; lost after
        self.dropped["dropped_reference_failed"] += n
        log.error("reference logprobs of a batch of engine %d failed (%d samples dropped): %s",
                  req.engine, n, what[:2000])
        self._count_failure(f"reference actor on a batch of engine {req.engine}: {what}")

    def _count_failure(self, what: str) -> None:
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= 4 * self.max_consecutive_failures:
            raise RuntimeError(f"{self._failures_in_a_row} rollout requests failed in a row, none "
                               f"succeeded; stopping instead of retrying forever. Last: {what[:2000]}")

    def _expire(self, now: float) -> bool:
        """Kill the engine of every request older than ``rollout.generate_timeout_s`` (a hung
        engine core never answers); returns whether any expired."""
        limit = self.cfg.generate_timeout_s
        expired = [(ref, r) for ref, r in self.inflight.items() if now - r.t0 >= limit]
        for ref, req in expired:
            del self.inflight[ref]
            n = req.n_groups * self.cfg.group_size
            self.dropped["dropped_generate_timeout"] += n
            why = f"request of {n} samples not done after rollout.generate_timeout_s={limit:.0f}s"
            log.error("rollout engine %d: %s; killing it", req.engine, why)
            self.rollouts.kill(req.engine, why)
            self._count_failure(f"rollout engine {req.engine}: {why}")
        return bool(expired)

    def _collect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._expire(time.monotonic()) and not self.inflight:
            return  # noticed even while other engines keep answering
        while True:
            now = time.monotonic()
            nearest = min(r.t0 for r in self.inflight.values()) + self.cfg.generate_timeout_s
            done, _ = ray.wait(list(self.inflight), num_returns=1,
                               timeout=max(0.0, min(nearest, deadline) - now))
            if done:
                break
            if self._expire(time.monotonic()):
                return
            if time.monotonic() >= deadline:
                engines = sorted(r.engine for r in self.inflight.values())
                raise TimeoutError(f"no rollout finished within {timeout:.0f}s (engines in flight: {engines})")
        refs = list(self.inflight)
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # everything else already done
        for ref in done:
            req = self.inflight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - classified, counted, logged in _failed
                self._failed(req, e)
                continue
            samples = from_arrow(result["batch"])
            if req.ref is not None:
                try:
                    ref_stats = self._attach_reference(req, samples)
                except Exception as e:  # noqa: BLE001 - counted and logged in _reference_failed
                    self._reference_failed(req, e)
                    continue
                result["stats"] = {**result["stats"], **ref_stats}
            self._failures_in_a_row = 0
            self._engine_failures[req.engine] = 0
            origin = [{**result["stats"], "engine": req.engine}]
            self.counts["generated"] += len(samples)
            g = self.cfg.group_size
            for i in range(0, len(samples), g):
                group = samples[i:i + g]
                if any(s.finish_reason == "abort" for s in group):
                    # the engine cancelled part of the group: an incomplete group has no
                    # meaningful mean, and an aborted sample is not a wrong answer
                    self.dropped["dropped_aborted"] += len(group)
                    continue
                self.ready.append(group)
                self._origin[id(group)] = origin

    def take(self, learner_version: int) -> tuple[list[list[Sample]], dict]:
        """Block until ``groups_per_step`` fresh groups are ready; return them (expiring ones
        first, then the freshest) and stats."""
        self.next_consumer = learner_version
        t0 = time.time()
        while True:
            fresh = [grp for grp in self.ready
                     if learner_version - grp[0].weight_version <= self.max_staleness]
            self.dropped["dropped_stale"] += sum(len(g) for g in self.ready) - sum(len(g) for g in fresh)
            # expiring first, then the freshest (stable: oldest-first within a version)
            expiring = learner_version - self.max_staleness
            fresh.sort(key=lambda grp: (grp[0].weight_version > expiring, -grp[0].weight_version))
            self.ready = deque(fresh)
            self._origin = {id(g): self._origin[id(g)] for g in fresh if id(g) in self._origin}
            if len(self.ready) >= self.groups_per_step:
                break
            self.fill()
            if not self.inflight and self.admit is not None and self.rollouts.starting:
                self.admit()  # every serving engine died: wait for the replacement, then serve
                continue
            if not self.inflight:
                raise RuntimeError("rollout stream stalled: nothing in flight and not enough samples "
                                   f"(ready={len(self.ready)}, need={self.groups_per_step})")
            self._collect(self.timeout_s)
        groups = [self.ready.popleft() for _ in range(self.groups_per_step)]
        self.takes += 1
        self.counts["trained"] += sum(len(g) for g in groups)
        stats = []
        for g in groups:
            box = self._origin.pop(id(g), [])
            if box:  # the first of its request's groups this stage takes
                stats.append(box.pop())
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

    def close(self) -> int:
        """End of a stage: wait for what is in flight and count every generated sample that will
        not be trained on (``dropped_end_of_stage``). Returns that count."""
        self.drain()
        left = sum(len(g) for g in self.ready)
        self.ready.clear()
        self._origin.clear()
        if left:
            self.dropped["dropped_end_of_stage"] += left
            log.info("%d generated samples left unused at the end of the stage (counted)", left)
        return left
