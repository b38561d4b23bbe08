"""The shared-prompt forward equals the plain one: logprobs, entropy logits and gradients."""
import pytest
import torch

from learner.prefix import prefix_shared_logprobs, split_rows, token_logprobs
from learner.batch import collate


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from rollout.tiny import create_tiny_model

    path = str(tmp_path_factory.mktemp("tiny"))
    create_tiny_model(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 9, 12, 7], [3, 4, 8, 11, 13, 6, 2], [10]]   # different lengths, one of length 1
    p_ids, r_ids = [], []
    for p in prompts:
        for _ in range(4):  # a group of 4 per prompt, responses of different lengths
            n = int(torch.randint(1, 9, (1,), generator=g))
            p_ids.append(p)
            r_ids.append(torch.randint(3, 30, (n,), generator=g).tolist())
    order = torch.randperm(len(p_ids), generator=g).tolist()  # groups need not be contiguous
    return collate([p_ids[i] for i in order], [r_ids[i] for i in order], None, None, pad_id=0)


def test_same_logprobs_entropy_and_gradients_as_the_plain_forward(model):
    b = batch()
    mask = b.response_mask
    model.zero_grad()
    lp0, logits0 = token_logprobs(model, b.input_ids, b.attention_mask, 0.7, return_logits=True)
    ((lp0 * mask).sum()).backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lp1, (logits1, lmask) = prefix_shared_logprobs(model, b.input_ids, b.attention_mask, mask, 0.7,
                                                   return_logits=True)
    ((lp1 * mask).sum()).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    assert lmask.shape[1] < mask.shape[1] - 1  # the shared path ran (responses only)
    assert torch.allclose(lp0 * mask, lp1, atol=1e-5), (lp0 * mask - lp1).abs().max()
    assert float((lp1.detach() * (1 - mask)).abs().max()) == 0.0
    for a, c in zip(g0, g1):
        assert torch.allclose(a, c, atol=1e-4, rtol=1e-4), (a - c).abs().max()
    from learner.losses import masked_entropy

    e0 = masked_entropy(logits0, mask[:, 1:])
    e1 = masked_entropy(logits1, lmask)
    assert abs(e0 - e1) < 1e-5


def test_rows_that_are_not_prompt_then_response_use_the_plain_forward(model):
    b = batch()
    assert split_rows(b.input_ids, b.attention_mask, b.response_mask) is not None
    mask = b.response_mask.clone()
    mask[0] = 0  # a row without a response
    assert split_rows(b.input_ids, b.attention_mask, mask) is None
    lp, (_, lmask) = prefix_shared_logprobs(model, b.input_ids, b.attention_mask, mask, return_logits=True)
    assert torch.equal(lmask, mask[:, 1:])
    with torch.no_grad():
        assert torch.allclose(lp, token_logprobs(model, b.input_ids, b.attention_mask))


def test_a_model_that_takes_no_kv_cache_falls_back_to_the_plain_forward(tmp_path, caplog):
    from learner.config import LearnerConfig
    from learner.torch_backend import TorchBackend
    from rollout.tiny import create_tiny_model

    be = TorchBackend(create_tiny_model(str(tmp_path)), LearnerConfig())
    inner = be.model

    class NoCache(torch.nn.Module):  # a forward without position_ids or a handed-in cache
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    b = batch()
    be.model = NoCache()
    with caplog.at_level("WARNING"):
        lp = be.logprobs(b)
    assert "using the plain forward" in caplog.text and not be._share_ok
    with torch.no_grad():
        assert torch.allclose(lp, token_logprobs(inner, b.input_ids, b.attention_mask))
