"""``get_all`` on a local Ray: the first failure raises at once, naming the failed actor, and leaves
the other actors' calls alone. Ray (2.60) can lose the order of an actor's calls when a call is
cancelled before it reached the actor: the actor then waits 30 s for it and fails every queued call
with ``ActorUnavailableError``. A weight sync whose engine died used to do that to the learner, and
the job stopped (found by tests/test_faults.py in CI)."""
import time

import pytest
import ray

from actors.common import ActorCallError, get_all


@ray.remote
class Worker:
    def work(self, s: float) -> str:
        time.sleep(s)
        return "done"

    def fail(self) -> None:
        raise ValueError("boom")

    def ping(self) -> str:
        return "pong"


@pytest.fixture(scope="module")
def workers():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    good, bad = Worker.remote(), Worker.remote()
    ray.get([good.ping.remote(), bad.ping.remote()])
    yield good, bad
    ray.shutdown()


def test_a_failure_raises_at_once_and_names_the_actor(workers):
    good, bad = workers
    t0 = time.monotonic()
    with pytest.raises(ActorCallError) as e:
        get_all([good.work.remote(3.0), bad.fail.remote()], "work", 60)
    assert time.monotonic() - t0 < 2.5  # did not wait for the slow call
    assert "1" in str(e.value) and "boom" in str(e.value)


def test_the_other_actors_stay_usable_after_a_failure(workers):
    good, bad = workers
    for _ in range(8):  # the lost-order race hit most rounds when calls were cancelled
        busy = good.work.remote(0.6)  # as the learner's send_weights was, in a collective
        time.sleep(0.2)
        failed = bad.fail.remote()
        ray.wait([failed], timeout=20)
        # good's call is just submitted, not yet delivered, when get_all sees bad's failure
        with pytest.raises(ActorCallError):
            get_all([failed, good.work.remote(0.1)], "work", 60)
        assert ray.get(good.ping.remote(), timeout=20) == "pong"
        assert ray.get(busy) == "done"


def test_a_timeout_names_the_late_actors(workers):
    good, _ = workers
    with pytest.raises(TimeoutError, match=r"\[0\]"):
        get_all([good.work.remote(2.0)], "work", 0.5)
    assert ray.get(good.ping.remote(), timeout=20) == "pong"
