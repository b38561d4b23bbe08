"""WorkerPool: hangs are killed at the deadline, crashes are reported, dead workers are replaced."""
import pytest

from rewards.pool import Task, WorkerPool


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "isolated"])
def pool(request):
    if request.param:
        from .conftest import sandbox_ok
        if not sandbox_ok()[0]:
            pytest.skip(f"no sandbox here: {sandbox_ok()[1]}")
    p = WorkerPool(2, isolated=request.param)
    assert p.wait_ready()
    yield p
    p.close()


def test_results_in_order(pool):
    out = pool.run([Task("math", (str(i), str(i if i % 2 else i + 1)), 5.0) for i in range(6)])
    assert [o.value for o in out] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert all(o.ok for o in out)


def test_timeout_crash_and_recovery(pool):
    out = pool.run([Task("sleep", 30, 0.3), Task("crash", None, 5.0), Task("ping", None, 5.0),
                    Task("nope", None, 5.0)])
    assert (out[0].ok, out[0].reason) == (False, "timeout")
    assert out[0].wall_s < 5
    assert not out[1].ok and out[1].reason == "crash (exit 3)"
    assert out[2].value == "pong"
    assert out[3].reason == "unknown task kind 'nope'"
    assert pool.counters["worker_crashes"] >= 1
    # the pool is whole again and still works
    assert [o.value for o in pool.run([Task("ping", None, 30.0)] * 3)] == ["pong"] * 3
    assert len(pool._workers) == 2


def test_closed_pool_refuses():
    p = WorkerPool(1)
    p.close()
    with pytest.raises(RuntimeError):
        p.run([Task("ping", None, 1.0)])


def test_hang_that_ignores_the_alarm_is_killed(pool):
    out = pool.run([Task("block", 30, 0.2), Task("ping", None, 5.0)])
    assert out[0].reason == "timeout" and out[0].wall_s < 3
    assert out[1].value == "pong"
    assert pool.counters["worker_kills"] >= 1
    assert pool.run([Task("ping", None, 30.0)])[0].value == "pong"


def test_worker_killed_between_batches_is_replaced(pool):
    import os
    import signal
    victim = pool._workers[0].proc.pid
    os.kill(victim, signal.SIGKILL)
    out = pool.run([Task("ping", None, 30.0) for _ in range(4)])
    assert [o.value for o in out] == ["pong"] * 4
    assert victim not in [w.proc.pid for w in pool._workers] and len(pool._workers) == 2
