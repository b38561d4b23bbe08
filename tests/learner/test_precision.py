"""``learner.compute_dtype``: bf16 forward and backward over float32 master parameters (torch
backend, CPU). The parameters the optimizer steps (and the engines receive) stay float32; a bf16
working copy computes, its gradients land in float32, and it is refreshed after every step."""
import pytest
import torch

from learner.batch import collate
from learner.config import LearnerConfig, LossConfig
from learner.precision import native_bf16, resolve_compute_dtype
from rollout.tiny import create_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), layers=2, hidden=64, heads=2,
                             kv_heads=1, intermediate=128)


def _batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[5 + j % 3, 6, 7, 8] for j in range(6)]
    responses = [torch.randint(3, 90, (3 + j % 4,), generator=g).tolist() for j in range(6)]
    lps = [[-1.0] * len(r) for r in responses]
    return collate(prompts, responses, lps, [1.0, -1.0, 0.5, -0.5, 2.0, -2.0], 0)


def _backend(path, compute, **kw):
    from learner.torch_backend import TorchBackend
    cfg = LearnerConfig(lr=1e-2, micro_batch_size=kw.pop("micro", 64), compute_dtype=compute,
                        loss=LossConfig(kl_coef=0.05, old_logprobs="learner"), **kw)
    return TorchBackend(path, cfg, 1.0)


def test_auto_is_bf16_exactly_where_the_device_has_native_bf16():
    cpu = torch.device("cpu")
    want = torch.bfloat16 if native_bf16(cpu) else torch.float32
    assert resolve_compute_dtype("auto", cpu) == want
    assert resolve_compute_dtype("float32", cpu) == torch.float32
    assert resolve_compute_dtype("bfloat16", cpu) == torch.bfloat16


def test_config_refuses_an_unknown_compute_dtype():
    with pytest.raises(ValueError, match="compute_dtype must be float32, bfloat16 or auto"):
        LearnerConfig(compute_dtype="fp8").validate()


def test_float32_masters_a_bf16_working_copy_and_a_bf16_reference(model):
    be = _backend(model, "bfloat16")
    assert {p.dtype for p in be.model.parameters()} == {torch.float32}
    assert {p.dtype for p in be.work.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in be.ref.parameters()} == {torch.bfloat16}
    # buffers (RoPE's inverse frequencies) are not rounded to bf16
    for (n, b), (_, w) in zip(be.model.named_buffers(), be.work.named_buffers()):
        assert w.dtype == b.dtype and torch.equal(w, b), n
    # the engines get the float32 masters
    assert {t.dtype for _, t in be.named_hf_weights()} == {torch.float32}
    plain = _backend(model, "float32")
    assert plain.work is plain.model and plain.ref.dtype == torch.float32


def test_training_steps_the_masters_and_refreshes_the_working_copy(model):
    be = _backend(model, "bfloat16", micro=2)  # 3 micro-batches: gradients accumulate
    before = {n: p.detach().clone() for n, p in be.model.named_parameters()}
    losses = [be.train_sft(_batch())["sft_loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.3, losses
    be.train_grpo(_batch())
    moved = 0
    for (n, m), w in zip(be.model.named_parameters(), be.work.parameters()):
        assert m.dtype == torch.float32 and w.grad is None
        assert torch.equal(w, m.detach().to(torch.bfloat16)), n
        moved += not torch.equal(m, before[n])
    assert moved == len(before)


def test_bf16_logprobs_are_close_to_float32_ones_but_not_equal(model):
    b = _batch()
    lp32 = _backend(model, "float32").logprobs(b)
    lp16 = _backend(model, "bfloat16").logprobs(b)
    assert lp16.dtype == torch.float32
    mask = b.response_mask > 0
    diff = (lp32 - lp16).abs()[mask]
    assert 0 < float(diff.mean()) < 0.05, float(diff.mean())


def test_resume_refuses_a_state_trained_in_another_compute_dtype(model, tmp_path):
    be = _backend(model, "float32")
    be.train_sft(_batch())
    be.save_state(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="learner.compute_dtype"):
        _backend(model, "bfloat16").load_state(str(tmp_path / "s"))
