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
    def __init__(self, fail_after=None, die_after=None, delay=0.05):
        self.version, self.calls = 0, 0
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
                          reward=float(j))
                   for r in records for j in range(g)]
        return {"batch": to_arrow(samples), "stats": {"time_generate_s": self.delay, "gen_tokens": len(samples)}}

    def set_version(self, v):
        self.version = v


@ray.remote
def passthrough(result):
    return result


class FakeRewards:
    def async_score(self, ref):
        return passthrough.remote(ref)


class FakePool:
    def __init__(self, actors, cfg):
        self.actors, self.cfg, self.alive = actors, cfg, set(range(len(actors)))

    def live(self):
        return [(i, self.actors[i]) for i in sorted(self.alive)]

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


def run(max_staleness, steps=6, engines=None, groups_per_step=4):
    cfg = RolloutConfig(group_size=2, prompts_per_request=2)
    engines = engines or [FakeEngine.remote(), FakeEngine.remote()]
    pool = FakePool(engines, cfg)
    stream = RolloutStream(pool, FakeRewards(), prompts(), groups_per_step, max_staleness, timeout_s=30)
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


def test_dead_engine_is_removed_and_counted():
    engines = [FakeEngine.remote(die_after=1), FakeEngine.remote()]
    _, _, stream = run(1, steps=4, engines=engines)
    assert stream.dropped["dropped_actor_died"] > 0
    assert [i for i, _ in stream.rollouts.live()] == [1]
