"""Reward shaping, masking and advantages of one GRPO step (learner.shaping), by hand."""
import pytest

from learner.shaping import is_failed_check, overlong_penalty, prepare_step
from rollout.types import Sample


def s(reward, n_tokens=4, finish="stop", reason="ok"):
    return Sample(prompt_id="p", group_index=0, prompt="", response="", prompt_ids=[1],
                  response_ids=[2] * n_tokens, response_logprobs=[-1.0] * n_tokens, weight_version=0,
                  finish_reason=finish, reward=reward, reward_reason=reason,
                  reward_components={"accuracy": reward})


def test_failed_check_reasons():
    assert is_failed_check("timeout") and is_failed_check("crash (signal 9)")
    assert is_failed_check("verifier_error: accuracy: RuntimeError: x")
    assert is_failed_check("worker_start_failed: no python")
    assert not is_failed_check("timeout (0/3 passed): test 1 took > 3 s")  # the program was slow
    assert not is_failed_check("wrong") and not is_failed_check("ok") and not is_failed_check("")


def test_overlong_penalty_by_hand():
    assert overlong_penalty(16, 20, 4) == 0.0
    assert overlong_penalty(17, 20, 4) == pytest.approx(-0.25)
    assert overlong_penalty(20, 20, 4, factor=0.5) == pytest.approx(-0.5)
    assert overlong_penalty(20, 20, 0) == 0.0


def test_truncated_samples_count_in_the_group_but_get_no_loss():
    g = [s(1.0), s(0.0), s(0.0, finish="length"), s(1.0)]
    taken, train, counts = prepare_step([g], 3)
    assert len(taken) == 4 and len(train) == 3 and counts["masked_truncated"] == 1
    assert [x.advantage for x in g] == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert g[2].meta["loss_masked"] == "truncated" and all(x.step == 3 for x in g)
    _, train, counts = prepare_step([g], 3, truncated="keep")
    assert len(train) == 4 and "masked_truncated" not in counts


def test_failed_checks_leave_the_group_statistics():
    g = [s(1.0), s(0.0), s(0.0, reason="timeout")]
    _, train, counts = prepare_step([g], 1)
    assert counts["masked_failed_check"] == 1 and g[2] not in train
    assert g[2].advantage == 0.0
    assert [g[0].advantage, g[1].advantage] == pytest.approx([1.0, -1.0], abs=1e-5)  # over 2 only
    g = [s(1.0), s(0.0), s(0.0, reason="timeout")]
    _, train, _ = prepare_step([g], 1, failed_checks="zero")
    assert len(train) == 3 and g[2].advantage < 0


def test_zero_variance_groups_counted_and_optionally_dropped():
    solved = [s(1.1), s(1.1), s(1.1)]
    mixed = [s(1.1), s(0.1), s(1.1)]
    _, train, counts = prepare_step([solved, mixed], 1)
    assert counts["zero_variance_groups"] == 1 and len(train) == 6
    assert [x.advantage for x in solved] == [0.0, 0.0, 0.0]
    _, train, counts = prepare_step([solved, mixed], 1, zero_variance="drop")
    assert len(train) == 3 and counts["masked_zero_variance"] == 3


def test_overlong_penalty_shapes_reward_before_advantages():
    g = [s(1.0, n_tokens=10), s(1.0, n_tokens=20)]
    prepare_step([g], 1, max_tokens=20, overlong_buffer=4, truncated="keep")
    assert g[1].reward == pytest.approx(0.0) and g[1].reward_components["overlong"] == -1.0
    assert g[0].advantage > 0 > g[1].advantage
