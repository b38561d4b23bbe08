"""The logic of the R1 stage types without actors: the rejection filter on hand-made samples,
Bradley-Terry loss and pair accuracy on hand-computed values, preference pairs, stage references
and per-stage overrides in the config."""
import math

import pytest
import torch

from cluster.cli import DEMO_CONFIG
from cluster.config import FilterConfig, load_config
from cluster.stages.reject import filter_samples
from cluster.stages.reward_model import bradley_terry_loss, build_pairs, pair_accuracy, split
from rollout.types import Sample

R1 = "cluster/configs/demo_r1.yaml"


def sample(pid, i, response, accuracy, finish="stop", tokens=None):
    return Sample(prompt_id=pid, group_index=i, prompt="User: q Assistant: <think>", response=response,
                  prompt_ids=[1], response_ids=[0] * (tokens or len(response)), response_logprobs=[],
                  weight_version=0, finish_reason=finish, reward_components={"accuracy": accuracy})


GOOD = " 3+4 is 7 </think> <answer> 7 </answer>"


def test_the_filter_keeps_exactly_the_verified_rows():
    samples = [
        sample("a", 0, GOOD, 1.0),                                           # kept
        sample("a", 1, " 3+4 is 8 </think> <answer> 8 </answer>", 0.0),      # wrong answer, good format
        sample("a", 2, "  3+4 IS 7 </think>  <answer> 7 </answer>", 1.0),    # same answer again: duplicate
        sample("b", 0, " 3+4 ist sieben ergibt 7 </think> <answer> 7 </answer>", 1.0),  # Latin script: kept
        sample("b", 1, " 3 加 4 等于 7 这个 </think> <answer> 7 </answer>", 1.0),  # right answer, wrong language
        sample("b", 2, "7", 1.0),                                            # right answer, no format
        sample("c", 0, GOOD, 1.0, finish="length"),                          # truncated
        sample("c", 1, GOOD, 1.0, finish="abort"),                           # aborted
        sample("c", 2, GOOD + " ", 1.0, tokens=500),                         # too long
    ]
    kept, rejected = filter_samples(samples, FilterConfig(language_min=0.9, max_tokens=100), "en")
    assert [(s.prompt_id, s.group_index) for s in kept] == [("a", 0), ("b", 0)]
    assert [(s.prompt_id, s.group_index, why) for s, why in rejected] == [
        ("a", 1, "accuracy"), ("a", 2, "duplicate"), ("b", 1, "language"), ("b", 2, "format"),
        ("c", 0, "truncated"), ("c", 1, "aborted"), ("c", 2, "length")]


def test_the_per_prompt_cap_and_switched_off_filters():
    samples = [sample("a", i, f" {i} </think> <answer> 7 </answer>", 1.0) for i in range(5)]
    kept, rejected = filter_samples(samples, FilterConfig(max_per_prompt=2))
    assert len(kept) == 2 and [why for _, why in rejected] == ["per_prompt_cap"] * 3
    loose = FilterConfig(accuracy_min=0.0, format=False, dedupe=False)
    kept, rejected = filter_samples([sample("a", 0, "7", 0.0), sample("a", 1, "7", 0.0)], loose)
    assert len(kept) == 2 and not rejected


def test_bradley_terry_loss_and_pair_accuracy_on_hand_computed_values():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    # -log sigmoid(2), -log sigmoid(0), -log sigmoid(-2)
    want = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert float(bradley_terry_loss(c, r)) == pytest.approx(want, rel=1e-6)
    assert pair_accuracy(c, r) == pytest.approx(1 / 3)  # a tie is not a win
    assert pair_accuracy(torch.zeros(0), torch.zeros(0)) == 0.0


def test_pairs_join_correct_and_wrong_answers_of_one_prompt():
    kept = [{"prompt_id": "p", "prompt": "P", "solution": s} for s in ("c1", "c2")] + \
           [{"prompt_id": "q", "prompt": "Q", "solution": "c3"}]
    rejected = [{"prompt_id": "p", "prompt": "P", "solution": "w1", "reject_reason": "accuracy"},
                {"prompt_id": "p", "prompt": "P", "solution": "f1", "reject_reason": "format"},
                {"prompt_id": "p", "prompt": "P", "solution": "d1", "reject_reason": "duplicate"},
                {"prompt_id": "r", "prompt": "R", "solution": "w2", "reject_reason": "accuracy"}]
    pairs = build_pairs(kept, rejected)
    # a duplicate of a kept answer is no worse than it: never the rejected side; prompts without a
    # kept answer (r) or without a rejected one (q) make no pair
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("P", "c1", "w1"), ("P", "c2", "f1")]
    many = [{"prompt_id": str(i), "prompt": "x", "chosen": "a", "rejected": "b"} for i in range(400)]
    train, test = split(many, 0.25)
    assert len(train) + len(test) == 400 and 60 < len(test) < 140
    assert not {p["prompt_id"] for p in train} & {p["prompt_id"] for p in test}


def test_stage_references_and_overrides_resolve():
    cfg = load_config(R1)
    final = cfg.for_stage(5)
    assert final.reward.weights == {"accuracy": 1.0, "format": 0.1, "reward_model": 1.0}  # replaced whole
    assert final.rollout == cfg.rollout and cfg.reward.weights == {"accuracy": 1.0, "format": 0.1}
    merged = load_config(R1, ["stages.5.rollout={temperature: 0.7}"]).for_stage(5).rollout
    assert merged.temperature == 0.7 and merged.max_tokens == cfg.rollout.max_tokens  # merged key by key


@pytest.mark.parametrize("override, message", [
    ("stages.1.reward.weights={accuracy: 1.0, reward_model: 1.0}", "stages.1.reward.weights.reward_model needs "
                                                    "stages.1.reward.options.reward_model.path"),
    ("stages.3.data.sft={from_stage: 6-distill}", "stages.3.data.sft.from_stage: stage '6-distill' is stage 6, not before stage 3"),
    ("stages.3.data.sft={from_stage: nope}", "no stage named 'nope'"),
    ("stages.3.data.sft={from_stage: 1-reasoning-rl}", "is a grpo stage, which does not produce a dataset"),
    ("stages.5.model={from_stage: 2-rejection}", "does not produce a policy checkpoint"),
    ("stages.5.model={from_stage: 4-reward-model}", "does not produce a policy checkpoint"),
    ("stages.5.reward.options.reward_model.path={from_stage: 3-sft}", "does not produce a reward model"),
    ("stages.2.reward.weights={format: 1.0}", "stages.2.reward.weights has no 'accuracy'"),
    ("stages.5.rollout.group_size=1", "stages.5.rollout.group_size must be >= 2"),
    ("stages.5.reward.nope=1", "unknown config key.*stages.5.reward.nope"),
    ("stages.6.student={}", "stages.6.student is missing"),
    ("stages.4.data.pairs=", "stages.4.data.pairs is missing"),
    ("stages.1.name=0-cold-start", "must be unique"),
    ("stages.3.data.sft=/no/such.csv", "stages.3.data.sft '/no/such.csv': no such file or folder"),
    ("stages.2.filters.language_min=2", "filters.language_min must be in"),
])
def test_bad_stage_configs_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(R1, [override])


def test_a_data_file_aha_cannot_use_fails_before_any_actor_starts(tmp_path, capsys):
    from cluster.cli import main

    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    csv = tmp_path / "q.csv"
    csv.write_text("problem,solution\nWhat is 1+1?,2\n")
    cases = [([f"data.train={bad}"], "cannot read .txt"),
             ([f"data.train={csv}"], "no usable rows"),
             ([f"data.train={csv}", "data.columns={question: problem, answer: answer_text}"],
              "column 'answer_text' \\(data.columns.answer\\) not found; columns: problem, solution"),
             ([f"data.sft={csv}", "data.columns={question: problem, answer: solution}"],
              "data.sft .* has no 'solution' column")]
    import re
    for over, message in cases:
        assert main(["train", DEMO_CONFIG, f"run.root={tmp_path}", "run.if_exists=overwrite", *over]) == 2
        err = capsys.readouterr().err
        assert err.startswith("aha: bad config:") and re.search(message, err), err
        assert not (tmp_path / "demo" / "metrics.jsonl").exists()


def test_prompt_sets_with_their_own_reward_weights(tmp_path):
    from cluster.controller import Controller
    from rewards import RewardConfig, build_scorer
    from rewards.types import RewardInput

    over = ["stages.5.data.train=[{source: arithmetic, reward_weights: {accuracy: 1.0, format: 0.1}},"
            " {source: {from_stage: 2-rejection}, reward_weights: {reward_model: 1.0}}]"]
    cfg = load_config(R1, [f"run.root={tmp_path}", *over])
    with pytest.raises(ValueError, match=r"stages.5.data.train.1.reward_weights.language: not a verifier"):
        load_config(R1, [over[0].replace("reward_model: 1.0", "language: 1.0")])
    with pytest.raises(ValueError, match=r"stages.5.data.train.1.from_stage: stage '6-distill' is stage 6"):
        load_config(R1, [over[0].replace("2-rejection", "6-distill")])
    ctl = Controller(cfg)
    ctl.outputs.update({"2-rejection": {"dataset": "/x/kept", "dataset_dir": "/x"}, "4-reward-model": {"checkpoint": "/rm"}})
    assert ctl.resolve(5).data.train[1] == {"source": "/x/kept", "reward_weights": {"reward_model": 1.0}}
    job = ctl.resolve(5)
    job.data.train = job.data.train[:1] + ["arithmetic"]
    recs = ctl.train_records(job)
    assert {r.meta.get("reward_weights", {}).get("format") for r in recs} == {0.1, None}
    assert len({r.id for r in recs}) == len(recs)  # ids stay unique across prompt sets
    # the scorer weighs each input by its own set's weights
    scorer = build_scorer(RewardConfig(weights={"accuracy": 1.0, "format": 0.5}, isolation="none"))
    try:
        good = " 7 </think> <answer> 7 </answer>"
        a, b = scorer.score_batch([RewardInput(good, "7"),
                                   RewardInput(good, "7", meta={"reward_weights": {"format": 1.0}})])
    finally:
        scorer.close()
    assert (a.score, b.score) == (1.5, 1.0) and a.components == b.components


def test_a_student_with_another_tokenizer_is_trained_on_its_own_ids():
    """Distillation hands text from teacher to student: the student's tokenizer re-tokenizes it."""
    from cluster.stages.sft import sft_samples
    from rollout.datasets import PromptRecord
    from rollout.tiny import build_tokenizer

    teacher = build_tokenizer()
    student = build_tokenizer()
    student.add_tokens(["plus", " is"])  # another vocabulary: whole words are single tokens
    rec = PromptRecord(id="p", question="What is 3 + 4?", answer="7",
                       solution=" 3 plus 4 is 7 </think> <answer> 7 </answer>")
    (a,), (b,) = sft_samples([rec], teacher, "r1_zero_compact"), sft_samples([rec], student, "r1_zero_compact")
    assert a.response_ids != b.response_ids and len(b.response_ids) < len(a.response_ids)
    assert student.decode(b.response_ids[:-1]) == rec.solution  # all but the EOS
    assert b.response_ids[-1] == student.eos_token_id
