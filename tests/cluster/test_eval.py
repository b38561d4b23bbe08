"""Evaluation numbers on hand-made samples: pass@1, and cons@k voting by math equivalence with the
real scorer (math-verify in its killable workers), no Ray."""
import pytest

from cluster.controller import eval_summary
from rewards import RewardConfig, build_scorer
from rewards.vote import cluster_answers, majority_vote
from rollout.types import Sample


@pytest.fixture(scope="module")
def scorer():
    s = build_scorer(RewardConfig(weights={"accuracy": 1.0}))
    yield s
    s.close()


def group(pid, answers, gold, scorer, finish=None):
    """Samples answering ``answers`` (None = no answer block), scored by the real verifier."""
    texts = [f"<think>x</think> <answer>{a}</answer>" if a is not None else "<think>no idea"
             for a in answers]
    from rewards.types import RewardInput
    res = scorer.score_batch([RewardInput(t, answer=gold) for t in texts])
    return [Sample(prompt_id=pid, group_index=j, prompt="q", response=t, prompt_ids=[1],
                   response_ids=[2, 3], response_logprobs=[-1.0, -1.0], weight_version=0,
                   finish_reason=(finish[j] if finish else "stop"), answer=gold,
                   reward=r.score, reward_components=dict(r.components))
            for j, (t, r) in enumerate(zip(texts, res))]


def test_equivalent_answers_vote_together(scorer):
    s = group("a", ["4", "4.0", "4.00", "5", "5"], "4", scorer)
    row = eval_summary(s, scorer.vote)
    assert row["accuracy"] == pytest.approx(3 / 5)
    assert row["cons_at_k"] == 1.0  # was 0: "5" won by string count


def test_fractions_in_three_spellings_are_one_cluster(scorer):
    s = group("b", ["\\frac{1}{2}", "1/2", "0.5", "2", "2"], "\\frac{1}{2}", scorer)
    assert eval_summary(s, scorer.vote)["cons_at_k"] == 1.0
    wrong = group("c", ["\\frac{1}{2}", "1/3", "1/3"], "\\frac{1}{3}", scorer)
    assert eval_summary(wrong, scorer.vote)["cons_at_k"] == 1.0


def test_ties_do_not_depend_on_sample_order(scorer):
    s = group("d", ["7", "8"], "7", scorer)
    forward = eval_summary(s, scorer.vote)["cons_at_k"]
    backward = eval_summary(list(reversed(s)), scorer.vote)["cons_at_k"]
    assert forward == backward == 0.5


def test_missing_answers_and_aborted_samples(scorer):
    s = group("e", [None, None, "3"], "3", scorer)
    assert eval_summary(s, scorer.vote)["cons_at_k"] == 1.0  # no answer does not vote
    none = group("f", [None, None], "3", scorer)
    assert eval_summary(none, scorer.vote)["cons_at_k"] == 0.0
    mixed = group("g", ["3", "3", "4"], "3", scorer, finish=["abort", "abort", "stop"])
    row = eval_summary(mixed, scorer.vote)
    assert row["aborted"] == 2 and row["num_samples"] == 1
    assert row["accuracy"] == 0.0 and row["cons_at_k"] == 0.0  # aborted ones are not scored


def test_two_prompts_average(scorer):
    s = group("h", ["1", "1"], "1", scorer) + group("i", ["2", "9", "9"], "2", scorer)
    row = eval_summary(s, scorer.vote)
    assert row["num_prompts"] == 2 and row["cons_at_k"] == 0.5
    assert row["accuracy"] == pytest.approx(3 / 5)


def test_cluster_answers_is_order_independent():
    eq = lambda a, b: float(a) == float(b)
    one = cluster_answers(["2", "2.0", "3", None], eq)
    two = cluster_answers([None, "3", "2.0", "2"], eq)
    assert one == [0, 0, 1, None] and two == [None, 1, 0, 0]
    assert majority_vote(["3", "2", "2.0"], [0, 1, 1], eq) == 1.0
    with pytest.raises(ValueError):
        majority_vote(["1"], [1, 0], eq)
