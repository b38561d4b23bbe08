"""Sample records, their Arrow schema, datasets and the tiny model's tokenizer."""
import json

import pyarrow.parquet as pq
import pytest

from rollout.datasets import arithmetic, load_prompts
from rollout.templates import render
from rollout.types import Sample, from_arrow, to_arrow


def _sample(**kw):
    base = dict(prompt_id="p", group_index=1, prompt="q", response="<answer> 3 </answer>",
                prompt_ids=[1, 2], response_ids=[3, 4, 5], response_logprobs=[-0.1, -0.2, -0.3],
                weight_version=7, reward=1.1, reward_components={"accuracy": 1.0, "format": 1.0},
                advantage=0.5, meta={"tests": [{"stdin": "1", "expected": "1"}]})
    base.update(kw)
    return Sample(**base)


def test_arrow_round_trip(tmp_path):
    s = [_sample(), _sample(group_index=2, reward_components={})]
    batch = to_arrow(s)
    assert batch.num_rows == 2
    back = from_arrow(batch)
    assert back[0].response_logprobs == pytest.approx(s[0].response_logprobs)
    assert back[0].reward_components == {"accuracy": 1.0, "format": 1.0}
    assert back[0].meta == s[0].meta and back[1].reward_components == {}
    pq.write_table(batch.to_table() if hasattr(batch, "to_table") else __import__("pyarrow").Table.from_batches([batch]),
                   tmp_path / "t.parquet")
    assert from_arrow(pq.read_table(tmp_path / "t.parquet"))[0].weight_version == 7


def test_arithmetic_splits_are_disjoint_seeded_and_correct():
    train, test = arithmetic("train", seed=1), arithmetic("test", seed=1)
    assert not {r.id for r in train} & {r.id for r in test}
    assert len(train) + len(test) == 2 * 50 * 50
    assert [r.id for r in arithmetic("train", seed=1)][:5] == [r.id for r in train[:5]]
    assert [r.id for r in arithmetic("train", seed=2)][:5] != [r.id for r in train[:5]]
    for r in train[:50]:
        a, op, b = r.question.removeprefix("What is ").removesuffix("?").split()
        assert int(r.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert f"<answer> {r.answer} </answer>" in r.solution


def test_load_prompts_counts_malformed_rows(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "no answer"}, "not json {", [1, 2],
            {"prompt": "2+2?", "answer": 4}]
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    recs, skipped = load_prompts(str(p))
    assert [r.answer for r in recs] == ["2", "4"]
    assert skipped == {"skipped_malformed": 3}


def test_load_prompts_rejects_a_file_with_nothing_usable(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"x": 1}\n')
    with pytest.raises(ValueError, match="no usable rows"):
        load_prompts(str(p))


def test_unknown_template_lists_known():
    with pytest.raises(ValueError, match="known: plain, qa, r1_zero"):
        render("chatml", "q")
    assert render("r1_zero", "What is 1+1?").endswith("User: What is 1+1?. Assistant: <think>")


def test_tiny_tokenizer_is_char_level_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    from rollout.tiny import create_tiny_model
    path = create_tiny_model(str(tmp_path / "m"), layers=1)
    tok = AutoTokenizer.from_pretrained(path)
    text = "User: What is 12 - 7? Assistant: <think> 12-7=5 </think> <answer> 5 </answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) == len(text) - sum(len(t) - 1 for t in ["<think>", "</think>", "<answer>", "</answer>"])


def test_a_plus_b_and_b_plus_a_land_on_the_same_side():
    train = {r.question for r in arithmetic("train", max_operand=20, heldout_fraction=0.2)}
    test = {r.question for r in arithmetic("test", max_operand=20, heldout_fraction=0.2)}
    for q in test:
        a, op, b = q.removeprefix("What is ").removesuffix("?").split()
        if op == "+":
            assert f"What is {b} + {a}?" not in train


def test_prompts_too_long_for_the_context_are_skipped_or_refused(tmp_path):
    from transformers import AutoTokenizer

    from rollout.datasets import PromptRecord, fit_prompts
    from rollout.tiny import create_tiny_model
    tok = AutoTokenizer.from_pretrained(create_tiny_model(str(tmp_path / "m"), layers=1))
    recs = [PromptRecord("a", "1+1", "2"), PromptRecord("b", "9" * 300, "9")]
    kept, skipped = fit_prompts(recs, tok, "r1_zero_compact", max_model_len=256, max_tokens=24)
    assert [r.id for r in kept] == ["a"] and skipped == {"skipped_prompt_too_long": 1}
    with pytest.raises(ValueError, match=r"every prompt is longer than .* = 256 - 24 = 232 tokens"):
        fit_prompts(recs[1:], tok, "r1_zero_compact", max_model_len=256, max_tokens=24)


def test_train_test_overlap_is_found():
    from rollout.datasets import PromptRecord, overlapping_questions
    train = [PromptRecord("a", "What is  2+2?", "4"), PromptRecord("b", "x", "1")]
    test = [PromptRecord("c", "what is 2+2?", "4"), PromptRecord("d", "y", "1")]
    assert overlapping_questions(train, test) == ["what is 2+2?"]


def test_prompts_get_bos_where_expected_and_targets_end_with_eos(tmp_path):
    from transformers import AutoTokenizer

    from rollout.templates import encode_prompt, encode_target
    from rollout.tiny import create_tiny_model
    tok = AutoTokenizer.from_pretrained(create_tiny_model(str(tmp_path / "m"), layers=1))
    plain = tok("12", add_special_tokens=False)["input_ids"]
    assert encode_prompt(tok, "12") == plain  # Qwen2-style: no BOS
    assert encode_target(tok, "12") == plain + [tok.eos_token_id]
    assert encode_target(tok, "12" + tok.eos_token) == plain + [tok.eos_token_id]  # not twice

    class Llama:  # a tokenizer that asks for BOS (add_bos_token), as Llama's does
        bos_token_id, eos_token_id, add_bos_token = 1, 2, True

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}
    assert encode_prompt(Llama(), "ab") == [1, 97, 98]
