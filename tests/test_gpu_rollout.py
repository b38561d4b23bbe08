"""GPU: the same rollout/learner/sync code as on CPU, with vLLM and the torch learner on CUDA.

Tolerance: the engine runs bfloat16 and the learner float32, so per-token logprobs may differ by
the bf16 rounding of weights and activations; we accept a mean |diff| below 0.05 nats and require
the pre-sync difference to be at least 10x that.
"""
import json
import os
import threading

import pytest
import torch

pytestmark = pytest.mark.gpu



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from rollout.tiny import create_tiny_model
    return create_tiny_model(str(tmp_path_factory.mktemp("m") / "tiny"), seed=3)


def test_gpu_engine_matches_learner_after_sync(tiny):
    from learner.batch import collate
    from learner.config import LearnerConfig
    from learner.torch_backend import TorchBackend
    from learner.weight_sync import TorchDistSender
    from rollout.engine import RolloutConfig, VllmEngine
    from rollout.weights import GroupSpec, free_tcp_port

    engine = VllmEngine(tiny, RolloutConfig(dtype="bfloat16", gpus_per_actor=1, max_model_len=256,
                                            gpu_memory_utilization=0.3, template="r1_zero_compact"))
    learner = TorchBackend(tiny, LearnerConfig(lr=3e-2, gpus_per_actor=1, micro_batch_size=8), 1.0)
    assert learner.device.type == "cuda"
    tok = learner.tokenizer
    p = tok("User: What is 17 + 25? Assistant: <think>", add_special_tokens=False)["input_ids"]
    r = tok(" 17+25=42 </think> <answer> 42 </answer>", add_special_tokens=False)["input_ids"]
    batch = collate([p] * 4, [r] * 4, None, None, tok.pad_token_id)
    for _ in range(3):
        learner.train_sft(batch)
    want = learner.logprobs(batch)[0][batch.response_mask[0] > 0]
    before = torch.tensor(engine.logprobs_of(p, r))
    # gloo: the learner and the engine share this one GPU (NCCL cannot put two ranks on one GPU)
    spec = GroupSpec("127.0.0.1", free_tcp_port(), 2, "gloo", timeout_s=120)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", TorchDistSender(spec, 1 << 20, "bfloat16")))
    t.start()
    engine.init_weight_group(spec, 1)
    t.join(60)
    sender = box["s"]
    metas = sender.metas(learner.named_hf_weights())
    t = threading.Thread(target=lambda: sender.send(learner.named_hf_weights(), learner.version))
    t.start()
    engine.receive_weights(metas, 1 << 20, learner.version)
    t.join(60)
    after = torch.tensor(engine.logprobs_of(p, r))
    d_before, d_after = (before - want).abs().mean().item(), (after - want).abs().mean().item()
    print(f"GPU sync: mean |engine - learner| before {d_before:.4f} after {d_after:.4f}")
    assert d_after < 0.05 and d_before > 10 * 0.05
    samples, stats = engine.generate([__import__("rollout.datasets", fromlist=["x"]).arithmetic("test")[0]], n=8)
    assert len(samples) == 8 and stats["gen_tokens"] > 0
    engine.shutdown()
    del learner
    torch.cuda.empty_cache()


GPU_JOB = ["stages.1.steps=3", "rollout.gpu_memory_utilization=0.3", "rollout.dtype=bfloat16",
           "eval.num_prompts=16"]
MEGATRON = ["learner.backend=megatron", "learner.dtype=bfloat16", "learner.reference=learner"]


def _run_job(tmp_path, name, overrides):
    """The demo job on the GPU (``GPU_JOB``) with ``overrides`` on a local Ray; returns its GRPO
    rows of metrics.jsonl."""
    import ray

    from cluster.cli import DEMO_CONFIG
    from cluster.config import load_config
    from cluster.controller import Controller, start_ray

    cfg = load_config(DEMO_CONFIG, [f"run.root={tmp_path}", f"run.name={name}", *GPU_JOB, *overrides])
    start_ray(cfg)
    try:
        Controller(cfg).run()
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in open(os.path.join(tmp_path, name, "metrics.jsonl"))]
    return [x for x in rows if x["stage"] == "1-grpo"]


def _show(rows, keys):
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in x.items() if k in keys}
            for x in rows]


def test_gpu_grpo_job_on_one_shared_gpu(tiny, tmp_path):
    grpo = _run_job(tmp_path, "gpu", [f"model.path={tiny}", "stages.0.steps=30",
                                      "rollout.gpus_per_actor=0.5", "learner.gpus_per_actor=0.5"])
    print("GPU job steps:", _show(grpo, ("step", "time_step_s", "time_train_s", "time_sync_s",
                                         "gen_tokens_per_s", "logprob_mismatch")))
    assert [x["weight_version"] for x in grpo] == [1, 2, 3]


def test_gpu_grpo_job_with_vllm_ipc_transfer(tiny, tmp_path):
    """The torch learner and the engine share the GPU; weights go through vLLM's CUDA-IPC engine."""
    grpo = _run_job(tmp_path, "ipc", [f"model.path={tiny}", "stages.0.steps=30",
                                      "rollout.gpus_per_actor=0.5", "learner.gpus_per_actor=0.5",
                                      "rollout.weight_transport=vllm_ipc"])
    print("IPC job steps:", _show(grpo, ("step", "time_sync_s", "sync_bytes", "logprob_mismatch")))
    assert [x["weight_version"] for x in grpo] == [1, 2, 3]
    assert all(x["logprob_mismatch"] < 0.05 for x in grpo)  # the engine serves the learner's weights


def test_gpu_megatron_backend_in_the_grpo_job(tiny, tmp_path):
    """The same `aha train` job with learner.backend=megatron (Megatron-core + TE layer spec) on a
    shared GPU, weights through vLLM's CUDA-IPC transfer, sampling at T=0.8, two PPO mini-batches."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformer_engine")
    grpo = _run_job(tmp_path, "mcore", [
        f"model.path={tiny}", "stages.0.steps=20", *MEGATRON, "rollout.gpus_per_actor=0.4",
        "learner.gpus_per_actor=0.5", "learner.mini_batches=2", "learner.micro_batch_size=32",
        "rollout.temperature=0.8", "rollout.weight_transport=vllm_ipc"])
    print("Megatron job steps:", _show(grpo, ("step", "time_train_s", "time_sync_s", "mismatch_abs",
                                              "logprob_mismatch", "entropy", "kl", "accuracy_mean")))
    assert [x["weight_version"] for x in grpo] == [1, 2, 3]
    assert all(x["entropy"] > 0 and x["logprob_mismatch"] < 0.05 for x in grpo)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (learner and engine apart)")
def test_gpu_megatron_job_with_vllm_nccl_transfer(tiny, tmp_path):
    pytest.importorskip("megatron.core")
    pytest.importorskip("transformer_engine")
    grpo = _run_job(tmp_path, "nccl", [
        f"model.path={tiny}", "stages.0.steps=20", *MEGATRON, "rollout.gpus_per_actor=1",
        "learner.gpus_per_actor=1", "rollout.weight_transport=vllm_nccl"])
    assert [x["weight_version"] for x in grpo] == [1, 2, 3]
    assert all(x["logprob_mismatch"] < 0.05 for x in grpo)
