"""Language consistency (pure, hand-computed shares) and the reward-model scorer on a tiny random model."""
import pytest

from rewards import RewardConfig, RewardInput, build_scorer
from rewards.language import chain_of_thought, language_share


@pytest.mark.parametrize("text,lang,expected", [
    ("all english words here", "en", (1.0, "ok")),
    ("two english 两个", "en", (0.5, "ok")),                       # 2 Latin words, 2 Han characters
    ("两个 words", "zh", (round(2 / 3, 6), "ok")),
    ("\\frac{1}{2} + 3 = x", "en", (1.0, "ok")),                  # LaTeX commands ignored, 'x' counts
    ("123 + 456 = 579", "en", (0.0, "no_cot_words")),
    ("Привет world", "ru", (0.5, "ok")),
    ("words ```python\nкод = 1\n``` more", "en", (1.0, "ok")),     # code fences ignored
])
def test_language_share(text, lang, expected):
    assert language_share(text, lang) == expected


def test_chain_of_thought_and_scorer():
    assert chain_of_thought("reason here</think><answer>4</answer>") == "reason here"
    assert chain_of_thought("<think>a b</think><answer>x</answer>") == "a b"
    assert chain_of_thought("no tags") == "no tags"
    s = build_scorer(RewardConfig(weights={"language": 1.0, "format": 0.5}, language="en"))
    r = s.score_batch([RewardInput("think in english 然后</think><answer>中文答案</answer>")])[0]
    assert r.components == {"language": 0.6, "format": 1.0} and r.score == 1.1   # 3 Latin words, 2 Han chars
    assert r.metrics["language_share"] == 0.6
    s.close()
    with pytest.raises(KeyError, match="unknown language 'xx'; known: ar, de"):
        build_scorer(RewardConfig(weights={"language": 1.0}, language="xx"))


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in "the answer is a b c 1 2 3 4 think".split():
        vocab[w] = len(vocab)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=1, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(cfg)
    d = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(d)
    fast.save_pretrained(d)
    return str(d)


def test_reward_model_scorer(tiny_rm_dir):
    import torch

    from rewards.reward_model import RewardModelScorer
    rm = RewardModelScorer.from_pretrained(tiny_rm_dir, batch_size=2, max_length=16)
    prompts, responses = ["the", "a", "b"], [" answer is 4", " b c", " 1 2 3 4 think"]
    scores = rm.score(prompts, responses)
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)
    # same numbers as running the model by hand, one text at a time (padding must not matter)
    for p, r, s in zip(prompts, responses, scores):
        enc = rm.tokenizer([p + r], return_tensors="pt")
        with torch.inference_mode():
            ref = torch.sigmoid(rm.model(**enc).logits[0, 0]).item()
        assert s == pytest.approx(ref, abs=1e-5)
    # through the scorer, composed with a rule reward
    sc = build_scorer(RewardConfig(weights={"reward_model": 0.5, "format": 1.0},
                                   options={"reward_model": {"path": tiny_rm_dir, "max_length": 16}}))
    r = sc.score_batch([RewardInput(" answer is 4", prompt="the")])[0]
    assert r.components["reward_model"] == pytest.approx(scores[0], abs=1e-5)
    assert r.score == pytest.approx(0.5 * scores[0])
    sc.close()
    with pytest.raises(ValueError, match="path"):
        build_scorer(RewardConfig(weights={"reward_model": 1.0}))
