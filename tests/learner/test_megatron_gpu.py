"""GPU tests of the Megatron backend (skipped without CUDA, megatron-core or Transformer Engine).

One process, world size 1. The vLLM weight-streaming check on a pretrained checkpoint lives in
``bench/bench_megatron.py check`` (it needs a few minutes: pretraining + an engine start).
"""
import gc
import json
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def stack():
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformer_engine.pytorch")
    transformers = pytest.importorskip("transformers")
    return transformers


def _tiny_moe(tmp, transformers, seed=0):
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        shared_expert_intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp)
    return model


def _batch(B=4, L=48, V=256, prompt=16, seed=0):
    from learner.batch import TrainBatch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    attn = torch.ones(B, L, dtype=torch.long)
    attn[0, L - 8:] = 0  # one right-padded row
    ids[0, L - 8:] = 0
    rmask = torch.zeros(B, L)
    rmask[:, prompt:] = 1.0
    rmask *= attn
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])[:B]
    return TrainBatch(ids, attn, rmask, torch.zeros(B, L), adv)


def _hf_logprobs(model, batch, temperature=1.0, with_entropy=False):
    model = model.cuda().eval()
    with torch.no_grad():
        logits = model(batch.input_ids.cuda(), attention_mask=batch.attention_mask.cuda()).logits
    logp = torch.log_softmax(logits.float() / temperature, -1)[:, :-1]
    lp = logp.gather(-1, batch.input_ids.cuda()[:, 1:, None])[..., 0]
    out = torch.zeros(batch.input_ids.shape)
    out[:, 1:] = lp.cpu()
    if not with_entropy:
        return out
    ent = -(logp.exp() * logp).sum(-1).cpu()  # [B, L-1], position t predicts token t+1
    m = batch.response_mask[:, 1:]
    return out, float((ent * m).sum() / m.sum())


def _backend(path, temperature=1.0, micro_batch_size=2, mini_batches=1, **mkw):
    from learner.config import LearnerConfig, LossConfig, MegatronConfig
    from learner.megatron.backend import MegatronBackend
    cfg = LearnerConfig(backend="megatron", gpus_per_actor=1, lr=1e-4, micro_batch_size=micro_batch_size,
                        mini_batches=mini_batches, dtype="bfloat16", loss=LossConfig(old_logprobs="learner"),
                        megatron=MegatronConfig(**mkw))
    return MegatronBackend(path, cfg, temperature=temperature)


def _free(*objs):
    del objs
    gc.collect()
    torch.cuda.empty_cache()


def test_logprobs_match_transformers(stack, tmp_path):
    hf = _tiny_moe(tmp_path, stack)
    batch = _batch()
    ref = _hf_logprobs(hf, batch)
    be = _backend(str(tmp_path))
    lp = be.logprobs(batch)
    m = batch.attention_mask.bool()
    m[:, 0] = False
    err = (lp - ref)[m].abs()
    print(f"megatron vs transformers logprobs (bf16, random tiny MoE): mean {err.mean():.4f} "
          f"max {err.max():.4f}")
    assert err.mean() < 0.02 and err.max() < 0.25
    _free(be, hf)


@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_grpo_and_sft_steps(stack, tmp_path, fp8):
    _tiny_moe(tmp_path, stack)
    be = _backend(str(tmp_path), fp8=fp8, fp8_recipe="delayed")
    batch = _batch(L=64)
    before = {n: t.clone() for n, t in be.named_hf_weights()}
    st = be.train_grpo(batch)
    print(fp8, {k: round(v, 4) for k, v in st.items() if not k.startswith("moe/tokens_per")})
    assert be.version == 1 and torch.isfinite(torch.tensor(st["loss"]))
    assert st["moe/load_imbalance"] >= 1.0 and st["moe/tokens_routed"] > 0
    assert abs(st["ratio_mean"] - 1.0) < 0.05  # old logprobs recomputed by the same weights
    after = dict(be.named_hf_weights())
    moved = sum(not torch.equal(before[k], after[k]) for k in before)
    assert moved > len(before) // 2
    st = be.train_sft(batch)
    assert be.version == 2 and torch.isfinite(torch.tensor(st["sft_loss"]))
    _free(be)


def test_save_hf_loads_in_transformers(stack, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _tiny_moe(src, stack)
    be = _backend(str(src))
    batch = _batch()
    be.train_sft(batch)
    be.save_hf(str(dst))
    assert json.load(open(dst / "config.json"))["model_type"] == "qwen2_moe"
    loaded = stack.Qwen2MoeForCausalLM.from_pretrained(str(dst), dtype=torch.bfloat16)
    ref = _hf_logprobs(loaded, batch)
    lp = be.logprobs(batch)
    m = batch.attention_mask.bool()
    m[:, 0] = False
    err = (lp - ref)[m].abs()
    print(f"after a step: megatron vs saved-and-reloaded transformers: mean {err.mean():.4f}")
    assert err.mean() < 0.02
    _free(be, loaded)


def test_logprobs_and_entropy_at_the_rollout_temperature(stack, tmp_path):
    """vLLM's processed logprobs are those of logits / T: the learner must score the same."""
    hf = _tiny_moe(tmp_path, stack)
    batch = _batch()
    ref, ref_ent = _hf_logprobs(hf, batch, temperature=0.7, with_entropy=True)
    be = _backend(str(tmp_path), temperature=0.7, micro_batch_size=4)
    lp = be.logprobs(batch)
    m = batch.attention_mask.bool()
    m[:, 0] = False
    err = (lp - ref)[m].abs()
    st = be.train_grpo(batch)  # one micro-batch: its entropy is the token mean over the batch
    print(f"T=0.7: logprob |diff| mean {err.mean():.4f} max {err.max():.4f}; entropy megatron "
          f"{st['entropy']:.4f} vs transformers {ref_ent:.4f}")
    assert err.mean() < 0.02 and err.max() < 0.25
    assert abs(st["entropy"] - ref_ent) < 0.02 * ref_ent
    _free(be, hf)


def test_mini_batches_take_that_many_optimizer_steps(stack, tmp_path):
    _tiny_moe(tmp_path, stack)
    be = _backend(str(tmp_path), micro_batch_size=1, mini_batches=2)
    before = {n: t.clone() for n, t in be.named_hf_weights()}
    st = be.train_grpo(_batch())
    assert be.version == 1 and torch.isfinite(torch.tensor(st["loss"]))
    # the second mini-batch is scored by weights the first step moved: its ratio is no longer 1
    assert abs(st["ratio_mean"] - 1.0) > 1e-5
    assert any(not torch.equal(before[k], t) for k, t in be.named_hf_weights())
    _free(be)


def test_fp8_config_is_validated_before_gpu_work(tmp_path, stack):
    _tiny_moe(tmp_path, stack)
    with pytest.raises(ValueError, match="fp8"):
        _backend(str(tmp_path), fp8="e5m2")
