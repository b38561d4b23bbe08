import pytest

from rewards import RewardConfig, build_scorer


@pytest.fixture(scope="session")
def math_scorer():
    """One scorer (one worker, imported once) shared by the math tests: accuracy + format."""
    s = build_scorer(RewardConfig(weights={"accuracy": 1.0, "format": 0.1}, timeout_s=3.0,
                                  workers_per_actor=1, options={"accuracy": {"cache_size": 0}}))
    s.warm_up()
    yield s
    s.close()


import os  # noqa: E402

from rewards.sandbox import UID_RANGE, _uid_pids, sandbox_available  # noqa: E402

_SANDBOX = None


def sandbox_ok():
    global _SANDBOX
    if _SANDBOX is None:
        _SANDBOX = sandbox_available()
    return _SANDBOX


@pytest.fixture(scope="session")
def needs_sandbox():
    ok, why = sandbox_ok()
    if not ok:
        pytest.skip(f"sandbox unavailable on this machine: {why}")
    if os.geteuid() != 0:
        pytest.skip("hostile sandbox suite needs root (it runs programs under fresh unprivileged uids)")


SECRET = "AHA_TEST_SECRET_7f3c91"


@pytest.fixture(scope="session")
def code_scorer(needs_sandbox):
    """accuracy on code tasks, 2 workers; the parent environment holds a secret the sandbox must not see."""
    os.environ["AHA_HOSTILE_SECRET"] = SECRET
    # 3 s per program: a hostile one is killed by then, and the normal job that must pass right
    # after gets room on a loaded 2-core machine (1 s made it time out there).
    s = build_scorer(RewardConfig(weights={"accuracy": 1.0}, workers_per_actor=2, timeout_s=3.0,
                                  options={"code": {"test_timeout_s": 3.0, "memory_mb": 256}}))
    s.warm_up()
    yield s
    s.close()


def sandbox_leftovers():
    """Live (non-zombie) processes still owned by a sandbox uid."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                uid = os.stat(f"/proc/{name}").st_uid
            except OSError:
                continue
            if UID_RANGE[0] <= uid < UID_RANGE[1]:
                out += [(pid, st) for pid, st in _uid_pids(uid) if st not in ("Z", "X")]
    return out
