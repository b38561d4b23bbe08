"""Scorer contract + math accuracy through the killable worker pool."""
import pytest

from rewards import RewardConfig, RewardInput, RewardResult, build_scorer, known_verifiers


def R(answer_text, think="ok let me see"):
    return f"{think}</think>\n<answer>{answer_text}</answer>"


@pytest.mark.parametrize("pred,gold,score", [
    ("4", "4", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("1/2", "\\frac12", 1.0),
    ("\\dfrac{3}{4}", "3/4", 1.0),
    ("\\{2,1\\}", "\\{1,2\\}", 1.0),                 # sets are unordered
    ("(0,1]", "(0,1]", 1.0),
    ("[0,1]", "(0,1]", 0.0),                         # intervals: closedness matters
    ("x = 5", "5", 1.0),
    ("1+x^2", "x^2+1", 1.0),
    ("2^{1/2}", "\\sqrt{2}", 1.0),
    ("The answer is $12$.", "12", 1.0),
    ("1,000", "1000", 1.0),
    ("5", "6", 0.0),
    ("-3", "3", 0.0),
    ("\\pi", "3.14", 0.0),
])
def test_math_equivalence(math_scorer, pred, gold, score):
    r = math_scorer.score_batch([RewardInput(R(pred), answer=gold)])[0]
    assert r.components["accuracy"] == score, r


def test_boxed_fallback_and_multiple_boxed(math_scorer):
    rs = math_scorer.score_batch([
        RewardInput("so the result is \\boxed{12}", answer="12"),
        RewardInput("either \\boxed{12} or \\boxed{13}", answer="12"),
        RewardInput(R("\\boxed{12} \\boxed{13}"), answer="12"),
        RewardInput("no answer at all", answer="12"),
    ])
    assert [r.components["accuracy"] for r in rs] == [1.0, 0.0, 0.0, 0.0]
    assert [r.reason for r in rs] == ["ok", "multiple_boxed", "multiple_boxed", "no_answer"]


def test_weighted_composition_order_and_reasons(math_scorer):
    inputs = [RewardInput(R("7"), answer="7"), RewardInput("7", answer="7"),
              RewardInput(R("8"), answer="7"), RewardInput("\\boxed{7}", answer="7")]
    rs = math_scorer.score_batch(inputs)
    assert len(rs) == 4 and all(isinstance(r, RewardResult) for r in rs)
    assert [r.score for r in rs] == [1.1, 0.0, 0.1, 1.0]
    assert [r.components for r in rs] == [
        {"accuracy": 1.0, "format": 1.0}, {"accuracy": 0.0, "format": 0.0},
        {"accuracy": 0.0, "format": 1.0}, {"accuracy": 1.0, "format": 0.0}]
    assert rs[2].reason == "wrong" and rs[2].reasons == {"accuracy": "wrong", "format": "ok"}
    assert rs[1].reasons["format"] == "missing </think>"


def test_bad_samples_never_raise(math_scorer):
    rs = math_scorer.score_batch([RewardInput(None, answer="1"), RewardInput(R("1"), answer=None),
                                  RewardInput(R("1"), answer="1", task="poetry"),
                                  RewardInput(R("1"), answer="1")])
    assert [r.components["accuracy"] for r in rs] == [0.0, 0.0, 0.0, 1.0]
    assert rs[0].reason == "bad_response_type" and rs[1].reason == "no_gold_answer"
    assert rs[2].reason.startswith("unknown_task 'poetry'")
    assert math_scorer.score_batch([]) == []


def test_stats_count(math_scorer):
    before = math_scorer.stats()
    math_scorer.score_batch([RewardInput(R(str(i)), answer=str(i)) for i in range(5)])
    after = math_scorer.stats()
    assert after["verifications"] - before["verifications"] == 5
    assert after["samples"] - before["samples"] == 5
    assert after["verifications_per_s"] > 0


def test_unknown_verifier_lists_known():
    with pytest.raises(KeyError) as e:
        build_scorer(RewardConfig(weights={"accuracy": 1.0, "acuracy": 1.0}))
    assert "unknown verifier 'acuracy'" in str(e.value)
    for name in known_verifiers():
        assert name in str(e.value)


def test_format_only_scorer_starts_no_workers():
    s = build_scorer(RewardConfig(weights={"format": 1.0}))
    assert s.score_batch([RewardInput(R("x"))])[0].score == 1.0
    assert s.ctx._pool is None
    s.close()


# Known false positives of the math check (math-verify 0.9.0 as called by rewards.mathcheck), pinned so
# that a change in behaviour is noticed. Each scores 1.0 today although a strict grader would say 0.
KNOWN_FALSE_POSITIVES = [
    ("10\\%", "10"),                  # percent sign dropped ...
    ("10\\%", "0.1"),                 # ... and also read as 0.1: both golds accept "10%"
    ("\\{1,2\\}", "(1,2)"),           # a set matches an ordered pair / open interval
    ("A", "a"),                       # symbols compared case-insensitively
    ("6.283185", "2\\pi"),            # 6-digit decimals match irrational values
    ("12\\text{ cm}", "12"),          # units are dropped
    ("2+2=4", "4"),                   # an equation counts as its right-hand side
]


@pytest.mark.parametrize("pred,gold", KNOWN_FALSE_POSITIVES)
def test_known_false_positives_are_pinned(math_scorer, pred, gold):
    r = math_scorer.score_batch([RewardInput(R(pred), answer=gold)])[0]
    assert r.components["accuracy"] == 1.0, "behaviour changed: move this case to test_math_equivalence"


HOSTILE_MATH = {
    "power_tower": "9^{9^{9^9}}",
    "power_tower_10": "10^{10^{10^{10}}}",
    "tall_tower": "2^{2^{2^{2^{2^{2}}}}}",
    "factorial_1e6": "1000000!",
    "factorial_googol": "(10^{100})!",
    "five_mb_answer": "1" * (5 << 20),
    "deep_parens": "(" * 3000 + "1" + ")" * 3000,
    "unbalanced_braces": "\\frac{1}{2",
    "unbalanced_box": "\\boxed{\\frac{1}{2}",
    "nul_bytes": "1\x002\x00",
    "only_nul": "\x00" * 100,
    "latex_garbage": "\\left( \\right] \\begin{matrix} & & \\\\",
}


def test_hostile_math_inputs_score_zero_within_timeout(math_scorer):
    import time
    names = sorted(HOSTILE_MATH)
    t0 = time.monotonic()
    rs = math_scorer.score_batch([RewardInput(f"<answer>{HOSTILE_MATH[n]}</answer>", answer="5") for n in names]
                                 + [RewardInput(R("5"), answer="5")])
    wall = time.monotonic() - t0
    for n, r in zip(names, rs):
        assert r.components["accuracy"] == 0.0, (n, r)
        assert r.reason, n
    assert rs[-1].components["accuracy"] == 1.0          # the scorer is fine right after
    # every hostile check ends by its deadline (3 s + kill grace); one worker runs them in turn
    assert wall < len(names) * 4.0
    st = math_scorer.stats()
    assert st["timeouts"] >= 3
    assert {r.reason for r in rs[:-1]} <= {"timeout", "answer_too_long", "wrong", "unparsable", "unbalanced_braces",
                                          "no_answer", "multiple_boxed"}
    assert math_scorer.score_batch([RewardInput(R("\\frac{1}{2}"), answer="0.5")])[0].score == 1.1


def test_truncated_response_earns_nothing_from_a_box_in_its_reasoning(math_scorer):
    text = "<think> 12-7 = \\boxed{5} so the answer is"
    cut = math_scorer.score_batch([RewardInput(text, answer="5", meta={"finish_reason": "length"})])[0]
    assert cut.components["accuracy"] == 0.0 and cut.reasons["accuracy"] == "truncated"
    # the same text that ended on its own is judged as before (boxed fallback)
    done = math_scorer.score_batch([RewardInput(text, answer="5", meta={"finish_reason": "stop"})])[0]
    assert done.components["accuracy"] == 1.0
    # cut after a complete answer block: the answer stands
    closed = "<think>x</think> <answer>5</answer> and then more"
    ok = math_scorer.score_batch([RewardInput(closed, answer="5", meta={"finish_reason": "length"})])[0]
    assert ok.components["accuracy"] == 1.0


def test_vote_by_equivalence_with_the_real_checker(math_scorer):
    assert math_scorer.vote([(["4", "4.0", "4.00", "5", "5"], [1, 1, 1, 0, 0])]) == [1.0]
    assert math_scorer.vote([(["\\frac{1}{2}", "1/2", "0.5", "3", "3"], [1, 1, 1, 0, 0])]) == [1.0]
    assert math_scorer.equal_answers([("\\frac{1}{2}", "0.5"), ("2", "3")]) == [True, False]
