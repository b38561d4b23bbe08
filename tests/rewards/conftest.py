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
