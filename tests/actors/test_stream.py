"""The asynchronous stream's staleness logic on a real local Ray, with fake engines.

The engines here are stand-ins (instant, deterministic) so the test isolates the admission and
drop rules; the real vLLM engines are exercised in tests/test_e2e.py.
"""
import itertools
import time

import pytest
import ray

from actors.stream import RolloutStream
from rollout.datasets import PromptRecord
from rollout.engine import RolloutConfig
from rollout.types import Sample, to_arrow


@ray.remote
class FakeEngine:
    def __init__(self, fail_after=None, die_after=None, delay=0.05, abort_on=None):
        self.version, self.calls, self.abort_on = 0, 0, abort_on
        self.fail_after, self.die_after, self.delay = fail_after, die_after, delay

    def generate(self, records, n=None, temperature=None):
        self.calls += 1
        if self.die_after is not None and self.calls > self.die_after:
            ray.actor.exit_actor()
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("engine blew up")
        time.sleep(self.delay)
        g = 2
        samples = [Sample(prompt_id=r.id, group_index=j, prompt="", response="", prompt_ids=[1],
                          response_ids=[2], response_logprobs=[-1.0], weight_version=self.version,
                          reward=float(j),
                          finish_reason="abort" if self.calls == self.abort_on and j == 0 else "stop")
                   for r in records for j in range(g)]
        return {"batch": to_arrow(samples), "stats": {"time_generate_s": self.delay, "gen_tokens": len(samples)}}

    @ray.method(num_returns=2)
    def generate_for_stream(self, records):  # RolloutActor's
        out = self.generate(records)
        return out, out["batch"].num_rows

    def set_version(self, v):
        self.version = v


@ray.remote
def passthrough(result):
    return result


@ray.remote
def fake_reference(generated, fails):  # ReferenceActor.logprobs's answer
    if fails:
        raise RuntimeError("reference blew up")
    cols = generated["batch"].to_pydict()
    return {"ref_logprobs": [[-0.5 - j] * len(r) for j, r in enumerate(cols["response_ids"])],
            "keys": list(zip(cols["prompt_id"], cols["group_index"])), "time_ref_s": 0.01}


class FakeReference:
    """learner.reference: pool; ``fails_every``: every k-th batch fails."""
    def __init__(self, fails_every=0):
        self.fails_every, self.n = fails_every, 0

    def submit(self, gen):
        self.n += 1
        return fake_reference.remote(gen, bool(self.fails_every) and self.n % self.fails_every == 0)


class FakeRewards:
    def async_score(self, ref):
        return passthrough.remote(ref), 0

    def restart(self, index, why, sent_at=None):
        pass


class FakePool:
    def __init__(self, actors, cfg):
        self.actors, self.cfg, self.alive = actors, cfg, set(range(len(actors)))
        self.retiring, self.starting, self.stopped = set(), {}, []

    def stop(self, i):
        self.retiring.discard(i)
        self.stopped.append(i)

    def live(self):
        return [(i, self.actors[i]) for i in sorted(self.alive)]

    def kill(self, i, why):
        ray.kill(self.actors[i])
        self.mark_dead(i, why)

    def mark_dead(self, i, why):
        self.alive.discard(i)
        if not self.alive:
            raise RuntimeError("every rollout engine is dead")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def prompts():
    return (PromptRecord(id=f"p{i}", question="q", answer="1") for i in itertools.count())


def run(max_staleness, steps=6, engines=None, groups_per_step=4, reference=None):
    cfg = RolloutConfig(group_size=2, prompts_per_request=2)
    engines = engines or [FakeEngine.remote(), FakeEngine.remote()]
    pool = FakePool(engines, cfg)
    stream = RolloutStream(pool, FakeRewards(), prompts(), groups_per_step, max_staleness, timeout_s=30,
                           reference=reference)
    version, stale, prefetched = 0, [], []
    stream.on_weights_updated(0)
    for _ in range(steps):
        groups, _ = stream.take(version)
        prefetched.append(len(stream.inflight))
        stale += [version - s.weight_version for g in groups for s in g]
        version += 1  # "train"
        for _, a in pool.live():  # "sync", queued behind generation like the real one
            try:
                ray.get(a.set_version.remote(version))
            except ray.exceptions.RayActorError:
                pass  # died while generating: the stream notices and counts it on its next take
        stream.on_weights_updated(version)
    return stale, prefetched, stream


@ray.remote(num_cpus=0)
class SlowScorer:
    def score(self, result, delay):
        time.sleep(delay)
        return result


class SlowRewards(FakeRewards):
    """One reward actor that takes 1 s a batch: batches are scored in the order they were sent,
    as by a RewardPool of one actor (separate Ray tasks could finish in any order when the test
    cluster's CPUs are taken, and a later batch overtake an earlier one)."""
    def __init__(self):
        self.actor = SlowScorer.remote()

    def async_score(self, ref):
        return self.actor.score.remote(ref, 1.0), 0


def one_engine_stream(rewards):
    """One fast fake engine, 2 prompts x 2 samples a request and a step, staleness 1, at version 0."""
    cfg = RolloutConfig(group_size=2, prompts_per_request=2)
    engine = FakeEngine.remote(delay=0.01)
    pool = FakePool([engine], cfg)
    stream = RolloutStream(pool, rewards, prompts(), 2, 1, timeout_s=30)
    stream.on_weights_updated(0)
    return engine, pool, stream


def test_an_engine_takes_its_next_request_while_its_last_batch_is_scored():
    # one engine, one request per step, scoring far slower than generating: after the weight
    # sync the engine starts the next request at once, not when the controller has collected
    # the scored batch (the engine idled that long before)
    engine, _, stream = one_engine_stream(SlowRewards())
    stream.take(0)  # request 1, scored; request 2 starts at version 0 (staleness 1 allows it)
    assert [r.engine for r in stream.inflight.values()] == [0]
    time.sleep(0.3)  # "train": request 2 is generated meanwhile, and still being scored
    ray.get(engine.set_version.remote(1))
    stream.on_weights_updated(1)
    assert sorted(r.generated for r in stream.inflight.values()) == [False, True]
    assert [r.engine for r in stream.inflight.values()] == [0, 0]  # request 3 is on its way
    for v in (1, 2):  # request 2 (version 0) feeds step 1, request 3 (version 1) step 2
        groups, _ = stream.take(v)
        assert {s.weight_version for g in groups for s in g} == {v - 1}
        ray.get(engine.set_version.remote(v + 1))
        stream.on_weights_updated(v + 1)
    assert stream.dropped["dropped_stale"] == 0


def test_synchronous_when_max_staleness_is_zero():
    stale, prefetched, stream = run(0)
    assert set(stale) == {0}
    assert prefetched == [0] * len(prefetched)  # nothing generated while the learner trains
    assert sum(stream.dropped.values()) == 0


def test_one_step_off_policy_overlaps_generation():
    stale, prefetched, stream = run(1)
    assert max(stale) <= 1 and 1 in stale
    assert any(prefetched)  # the next batch was in flight during "training"
    assert sum(stream.dropped.values()) == 0


def test_stale_samples_are_dropped_and_counted():
    _, _, stream = run(1, steps=1)
    # pretend the learner jumped ahead 3 versions: everything buffered or in flight is too old
    stream.drain()
    buffered = sum(len(g) for g in stream.ready)
    assert buffered > 0
    stream.max_staleness = 0
    ray.get([a.set_version.remote(4) for _, a in stream.rollouts.live()])
    stream.on_weights_updated(4)
    stream.take(4)
    assert stream.dropped["dropped_stale"] == buffered


def test_failed_request_is_counted_and_the_stream_goes_on():
    engines = [FakeEngine.remote(fail_after=1), FakeEngine.remote()]
    stale, _, stream = run(1, steps=4, engines=engines)
    assert stream.dropped["dropped_request_error"] > 0
    assert len(stale) == 4 * 4 * 2


def test_reference_logprobs_ride_on_the_samples():
    cfg = RolloutConfig(group_size=2, prompts_per_request=2)
    pool = FakePool([FakeEngine.remote()], cfg)
    stream = RolloutStream(pool, FakeRewards(), prompts(), 2, 1, timeout_s=30, reference=FakeReference())
    stream.on_weights_updated(0)
    groups, info = stream.take(0)
    assert [s.ref_logprobs for g in groups for s in g] == [[-0.5], [-1.5], [-2.5], [-3.5]]
    assert all(r["time_ref_s"] == 0.01 for r in info["requests"])
    # without a reference nothing is asked for, and the samples carry none
    _, _, plain = run(1, steps=1)
    assert all(s.ref_logprobs is None for g in plain.ready for s in g)


def test_failed_reference_is_counted_and_the_stream_goes_on():
    stale, _, stream = run(1, steps=4, reference=FakeReference(fails_every=3))
    lost = stream.dropped["dropped_reference_failed"]
    assert lost > 0 and lost % 2 == 0  # whole requests (one or two groups), generated and scored first
    assert len(stale) == 4 * 4 * 2 and stream.counts["trained"] == 4 * 4 * 2
    assert all(s.ref_logprobs is not None for g in stream.ready for s in g)
    assert stream.counts["generated"] == stream.counts["trained"] + lost + sum(len(g) for g in stream.ready)


def test_dead_engine_is_removed_and_counted():
    engines = [FakeEngine.remote(die_after=1), FakeEngine.remote()]
    _, _, stream = run(1, steps=4, engines=engines)
    assert stream.dropped["dropped_actor_died"] > 0
    assert [i for i, _ in stream.rollouts.live()] == [1]


@ray.remote
class RewardStub:
    """Scores by passing the result through; exits (a dead actor) on call number ``die_on``."""

    def __init__(self, die_on=None):
        self.calls, self.die_on = 0, die_on

    def ready(self):
        return True

    def score(self, result):
        self.calls += 1
        if self.die_on is not None and self.calls == self.die_on:
            ray.actor.exit_actor()
        return result


class RestartingRewards:
    """Two real reward actors used round-robin; the first dies on its second batch. Replaces a
    dead one as RewardPool does: not again for a call sent before the replacement started."""

    def __init__(self):
        self.actors = [RewardStub.remote(die_on=2), RewardStub.remote()]
        self.started = [time.monotonic()] * 2
        self.rr = itertools.cycle(range(2))
        self.restarted = []

    def async_score(self, ref):
        i = next(self.rr)
        return self.actors[i].score.remote(ref), i

    def restart(self, index, why, sent_at=None):
        if sent_at is not None and self.started[index] > sent_at:
            return
        self.restarted.append(index)
        self.actors[index] = RewardStub.remote()
        self.started[index] = time.monotonic()


def test_dead_reward_actor_is_restarted_and_no_engine_is_blamed():
    cfg = RolloutConfig(group_size=2, prompts_per_request=2)
    pool = FakePool([FakeEngine.remote(), FakeEngine.remote()], cfg)
    rewards = RestartingRewards()
    stream = RolloutStream(pool, rewards, prompts(), 2, 1, timeout_s=30)
    stream.on_weights_updated(0)
    trained = 0
    for v in range(6):
        groups, _ = stream.take(v)
        trained += sum(len(g) for g in groups)
        ray.get([a.set_version.remote(v + 1) for _, a in pool.live()])
        stream.on_weights_updated(v + 1)
    assert rewards.restarted == [0]
    assert [i for i, _ in pool.live()] == [0, 1]  # both engines still in the pool
    # one retry per batch queued on the dead actor: one, or two when an engine's next request
    # was already on it while its last was scored; the actor itself is replaced once
    assert stream.counts["reward_retries"] in (1, 2)
    assert "dropped_actor_died" not in stream.dropped and "dropped_reward_failed" not in stream.dropped
    assert trained == stream.counts["trained"] == 6 * 2 * 2
    # the retried batch was scored once more, not counted twice
    stream.close()
    # every generated sample is trained on, dropped as stale or left at the end: all counted once
    assert set(stream.dropped) <= {"dropped_stale", "dropped_end_of_stage"}
    assert stream.counts["generated"] == stream.counts["trained"] + sum(stream.dropped.values())


def test_a_reward_actor_replaced_already_is_not_replaced_again_by_a_late_failure():
    # two batches were queued on a reward actor that died: both calls fail. The first failure
    # replaces the actor; the second (sent before that) must keep the replacement, which is
    # scoring the first batch again: replacing it killed that retry, whose failure replaced
    # the next one, and so on (13 batches in a row were lost that way in a fault test)
    from actors.reward import RewardPool
    from rewards.config import RewardConfig

    class StubPool(RewardPool):
        def _start(self, index):
            self.started[index] = time.monotonic()
            return RewardStub.remote()

    pool = StubPool(RewardConfig(num_actors=1), start_timeout_s=30)
    sent = time.monotonic()
    ray.kill(pool.actors[0])
    pool.restart(0, "ActorDiedError", sent_at=sent)
    fresh = pool.actors[0]
    pool.restart(0, "ActorDiedError", sent_at=sent)  # the other call queued on the dead actor
    assert pool.actors[0] is fresh and ray.get(fresh.ready.remote()) is True
    pool.restart(0, "ActorDiedError", sent_at=time.monotonic())  # a call sent to the fresh one
    assert pool.actors[0] is not fresh


def test_requests_larger_than_a_step_waste_nothing_when_synchronous():
    # prompts_per_request 4 > groups_per_step 2 at max_staleness 0 used to drop ~half as stale
    cfg = RolloutConfig(group_size=2, prompts_per_request=4)
    engines = [FakeEngine.remote(), FakeEngine.remote()]
    pool = FakePool(engines, cfg)
    stream = RolloutStream(pool, FakeRewards(), prompts(), 2, 0, timeout_s=30, total_takes=5)
    stream.on_weights_updated(0)
    for v in range(5):
        groups, _ = stream.take(v)
        assert {s.weight_version for g in groups for s in g} == {v}
        ray.get([a.set_version.remote(v + 1) for a in engines])
        stream.on_weights_updated(v + 1)
    assert stream.dropped["dropped_stale"] == 0
    assert stream.counts["generated"] == stream.counts["trained"] == 5 * 2 * 2
    assert stream.close() == 0


def test_expiring_groups_go_first_then_the_freshest():
    cfg = RolloutConfig(group_size=2, prompts_per_request=1)
    stream = RolloutStream(FakePool([], cfg), FakeRewards(), prompts(), 1, 2, timeout_s=30)
    mk = lambda v: [Sample(prompt_id=f"v{v}", group_index=j, prompt="", response="", prompt_ids=[1],
                           response_ids=[2], response_logprobs=[-1.0], weight_version=v) for j in range(2)]
    stream.ready.extend([mk(4), mk(2), mk(3)])
    groups, _ = stream.take(4)  # max_staleness 2: step 4 is the last that can use version 2
    assert groups[0][0].weight_version == 2
    assert [g[0].weight_version for g in stream.ready] == [4, 3]  # then the freshest
    groups, _ = stream.take(4)
    assert groups[0][0].weight_version == 4
    stream.ready.extend([mk(1), mk(5)])
    groups, _ = stream.take(5)  # version 1 is past the bound (dropped); 3 expires at step 5
    assert groups[0][0].weight_version == 3 and stream.dropped["dropped_stale"] == 2
    assert [g[0].weight_version for g in stream.ready] == [5]


def test_a_late_step_does_not_let_a_newer_batch_make_an_older_one_stale():
    # the learner takes after both the batch made at version 0 (for step 1) and the one the engine
    # started at version 1 (for step 2) are in: step 1 must take the older one, which step 2
    # could no longer use, and leave the newer one for step 2
    engine, _, stream = one_engine_stream(FakeRewards())
    stream.take(0)  # request 1; request 2 starts at version 0
    time.sleep(0.3)
    ray.get(engine.set_version.remote(1))
    stream.on_weights_updated(1)  # request 3 starts at version 1
    time.sleep(0.5)  # a slow step: both are scored before step 1 takes
    groups, info = stream.take(1)
    assert {s.weight_version for g in groups for s in g} == {0}
    assert len(info["requests"]) == 1  # each step reports the request it trains on
    ray.get(engine.set_version.remote(2))
    stream.on_weights_updated(2)
    groups, info = stream.take(2)
    assert {s.weight_version for g in groups for s in g} == {1}
    assert len(info["requests"]) == 1  # collected during step 1, reported with step 2
    assert stream.dropped["dropped_stale"] == 0


def test_requests_that_always_fail_stop_the_job_with_the_error():
    # e.g. every prompt too long for the engine: a bounded number of failures, then a clear stop
    cfg = RolloutConfig(group_size=2, prompts_per_request=2)
    pool = FakePool([FakeEngine.remote(fail_after=0)], cfg)
    pool.mark_dead = lambda i, why: (_ for _ in ()).throw(RuntimeError(f"every rollout engine is dead: {why}"))
    stream = RolloutStream(pool, FakeRewards(), prompts(), 2, 1, timeout_s=30, max_consecutive_failures=5)
    stream.on_weights_updated(0)
    with pytest.raises(RuntimeError, match="(?s)last 5 requests in a row failed.*engine blew up"):
        stream.take(0)
    assert stream.dropped["dropped_request_error"] == 5 * 2 * 2


def test_an_engine_that_keeps_failing_is_removed_while_the_others_go_on():
    cfg = RolloutConfig(group_size=2, prompts_per_request=2)
    pool = FakePool([FakeEngine.remote(fail_after=0, delay=0), FakeEngine.remote(delay=0.2)], cfg)
    stream = RolloutStream(pool, FakeRewards(), prompts(), 2, 1, timeout_s=30, max_consecutive_failures=3)
    stream.on_weights_updated(0)
    for v in range(3):
        stream.take(v)
        ray.get([a.set_version.remote(v + 1) for _, a in pool.live()])
        stream.on_weights_updated(v + 1)
    assert [i for i, _ in pool.live()] == [1]
    assert stream.dropped["dropped_request_error"] == 3 * 2 * 2


def test_hung_engine_is_killed_after_generate_timeout_and_the_stream_goes_on():
    cfg = RolloutConfig(group_size=2, prompts_per_request=2, generate_timeout_s=1.5)
    hung = FakeEngine.options(max_concurrency=2).remote(delay=0.05)  # set_version still answers
    engines = [hung, FakeEngine.remote()]
    ray.get(hung.set_version.remote(0))
    pool = FakePool(engines, cfg)
    stream = RolloutStream(pool, FakeRewards(), prompts(), 2, 1, timeout_s=60)
    # the first engine hangs on its next call (an engine core that died mid-generation)
    ray.get(hung.__ray_call__.remote(lambda self: setattr(self, "delay", 3600)))
    stream.on_weights_updated(0)
    t0, v = time.monotonic(), 0
    while len(pool.live()) > 1 and time.monotonic() - t0 < 30:
        stream.take(v)
        v += 1
        ray.get([a.set_version.remote(v) for _, a in pool.live()])
        stream.on_weights_updated(v)
    assert time.monotonic() - t0 < 30  # bounded by generate_timeout_s, not by run.timeout_s
    assert v > 1  # the healthy engine kept the steps going meanwhile
    assert [i for i, _ in pool.live()] == [1]
    assert stream.dropped["dropped_generate_timeout"] == 2 * 2


def test_groups_with_an_aborted_sample_are_dropped_and_counted():
    cfg = RolloutConfig(group_size=2, prompts_per_request=2)
    pool = FakePool([FakeEngine.remote(abort_on=1)], cfg)
    stream = RolloutStream(pool, FakeRewards(), prompts(), 2, 0, timeout_s=30)
    stream.on_weights_updated(0)
    groups, _ = stream.take(0)
    assert stream.dropped["dropped_aborted"] == 2 * 2  # both groups of the first request
    assert all(s.finish_reason == "stop" for g in groups for s in g)


def test_an_eval_failure_names_the_engine_or_the_reward_pool():
    from cluster.controller import blame

    ok, bad = FakeEngine.remote(), FakeEngine.remote(fail_after=0)
    recs = [PromptRecord(id="p", question="q", answer="1")]
    gens = [(0, ok.generate.remote(recs)), (1, bad.generate.remote(recs))]
    ray.wait([g for _, g in gens], num_returns=2, timeout=30)
    assert blame(gens, RuntimeError("x")).startswith("rollout engine 1: ")
    assert blame(gens[:1], RuntimeError("scorer broke")) == "reward pool: RuntimeError: scorer broke"
