"""Megatron backend on one GPU: correctness against vLLM, and benchmarks.

Subcommands (each prints one JSON line per result, prefixed ``RESULT``):

- ``check``  pretrain a small Qwen2-MoE with transformers on synthetic text (so logit gaps are
  real), convert it into the Megatron backend, save it back with ``save_hf`` and start vLLM on
  that saved checkpoint (it loads in vLLM), then: learner vs vLLM logprobs at version 0; a few
  training steps; IPC stream into vLLM; logprobs again (BF16 learner, and an FP8 learner on the
  same weights); the saved checkpoint reloaded in transformers.
- ``step``   learner step time BF16 vs FP8 on a MoE large enough for FP8 to matter; tokens/s, MFU.
- ``grpo``   one GRPO step with vLLM and Megatron sharing one GPU, by phase, plus IPC sync GB/s next
  to the device's copy bandwidth.

Run on the GPU machine: ``python bench/bench_megatron.py check|step|grpo``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense BF16, SXM


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def peak_tflops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 989.0)


# ------------------------------------------------------------------------------------------ data
V = 256


def chain_sequences(n: int, length: int, seed: int, rule: int = 0) -> torch.Tensor:
    """Synthetic 'language': next = (a * prev + b) mod V' with 10% noise; rule picks (a, b)."""
    g = torch.Generator().manual_seed(seed)
    a, b = [(5, 17), (7, 3)][rule]
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(3, V, (n,), generator=g)
    for t in range(1, length):
        nxt = (a * x[:, t - 1] + b) % (V - 3) + 3
        noise = torch.rand(n, generator=g) < 0.1
        x[:, t] = torch.where(noise, torch.randint(3, V, (n,), generator=g), nxt)
    return x


def write_tokenizer(path: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<eos>"]
    chars = [chr(c) for c in range(32, 127)]
    chars += [chr(0x100 + i) for i in range(V - len(specials) - len(chars))]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + chars)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="<eos>").save_pretrained(path)


def pretrain(path: str, steps: int) -> dict:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    cfg = Qwen2MoeConfig(vocab_size=V, hidden_size=512, intermediate_size=1024,
                         moe_intermediate_size=256, shared_expert_intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         num_experts=16, num_experts_per_tok=4, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=2, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    data = chain_sequences(8192, 128, seed=1)
    t0 = time.time()
    for step in range(steps):
        ids = data[torch.randint(0, len(data), (64,))].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for gp in opt.param_groups:
            gp["lr"] = 2e-3 * (1 - step / steps) + 1e-4
    model.to(torch.bfloat16).save_pretrained(path)
    write_tokenizer(path)
    out = {"pretrain_steps": steps, "pretrain_final_loss": float(loss), "pretrain_s": time.time() - t0}
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------ helpers
def make_backend(path, fp8=None, recipe="delayed", lr=1e-4, mbs=8, init_from_hf=True,
                 old_logprobs="learner", **opts):
    from learner.config import LearnerConfig, LossConfig, MegatronConfig
    from learner.megatron.backend import MegatronBackend, MegatronOptions
    cfg = LearnerConfig(backend="megatron", gpus_per_actor=1, lr=lr, micro_batch_size=mbs,
                        dtype="bfloat16", loss=LossConfig(old_logprobs=old_logprobs),
                        megatron=MegatronConfig(fp8=fp8, fp8_recipe=recipe))
    return MegatronBackend(path, cfg, MegatronOptions(init_from_hf=init_from_hf, **opts))


def start_vllm(path, util=0.25, dummy=False, max_len=1024):
    from vllm import LLM
    kw = dict(model=path, dtype="bfloat16", gpu_memory_utilization=util, max_model_len=max_len,
              enforce_eager=True, seed=0, weight_transfer_config={"backend": "ipc"},
              max_num_seqs=256)
    if dummy:
        kw.update(load_format="dummy", skip_tokenizer_init=True)
    t0 = time.time()
    llm = LLM(**kw)
    return llm, time.time() - t0


def vllm_prompt_logprobs(llm, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` logprobs of each prompt token under the engine (position 0 -> 0)."""
    from vllm import SamplingParams
    sp = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=1.0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": r.tolist()} for r in ids], sp, use_tqdm=False)
    res = torch.zeros(ids.shape)
    for i, o in enumerate(outs):
        for t, d in enumerate(o.prompt_logprobs):
            if d is not None:
                res[i, t] = d[int(ids[i, t])].logprob
    return res


def lm_batch(ids: torch.Tensor, prompt: int = 1, adv=None):
    from learner.batch import TrainBatch
    B, L = ids.shape
    rmask = torch.zeros(B, L)
    rmask[:, prompt:] = 1.0
    adv = torch.zeros(B) if adv is None else adv
    return TrainBatch(ids, torch.ones(B, L, dtype=torch.long), rmask, torch.zeros(B, L), adv)


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a[:, 1:] - b[:, 1:]).abs()
    return {"mean_abs": float(d.mean()), "p99_abs": float(d.flatten().quantile(0.99)),
            "max_abs": float(d.max())}


def hf_logprobs(path, ids):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        logits = m(ids.cuda()).logits.float()
    lp = torch.zeros(ids.shape)
    lp[:, 1:] = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids.cuda()[:, 1:, None])[..., 0].cpu()
    del m
    torch.cuda.empty_cache()
    return lp


# ------------------------------------------------------------------------------------------ check
def cmd_check(a):
    # Load TE (and its cuDNN) before torch touches cuDNN in the pretraining: the other order picks
    # up the system libcudnn_cnn against torch's libcudnn_graph and fails to import.
    import megatron.core  # noqa: F401
    import transformer_engine.pytorch  # noqa: F401

    from learner.megatron.weight_stream import EngineReceiver, LocalEngine, WeightStreamSender
    root = a.workdir
    ck0, ck1, ck2 = (os.path.join(root, n) for n in ("pretrained_hf", "megatron_v0", "megatron_v3"))
    result(stage="pretrain", **pretrain(ck0, a.pretrain_steps))
    fixed = chain_sequences(16, 128, seed=99)
    hf0 = hf_logprobs(ck0, fixed)
    result(stage="pretrained_confidence", mean_logprob=float(hf0[:, 1:].mean()))

    be = make_backend(ck0, lr=a.lr)
    lp0 = be.logprobs(lm_batch(fixed))
    result(stage="convert_hf_to_megatron", vs_transformers=diff(lp0, hf0))
    be.save_hf(ck1)
    result(stage="save_hf_v0", vs_transformers_reloaded=diff(lp0, hf_logprobs(ck1, fixed)))

    llm, t_start = start_vllm(ck1)  # a checkpoint written by save_hf loads in vLLM
    vl0 = vllm_prompt_logprobs(llm, fixed)
    result(stage="vllm_v0", engine_start_s=t_start, learner_vs_vllm=diff(lp0, vl0))

    sender = WeightStreamSender("ipc", [LocalEngine(EngineReceiver(llm))], bucket_bytes=256 << 20)
    # move the policy: SFT on a second rule (large logprob shifts), then a GRPO step
    other = chain_sequences(64, 128, seed=5, rule=1)
    for _ in range(3):
        st = be.train_sft(lm_batch(other))
    grpo = lm_batch(other[:32], prompt=16, adv=torch.randn(32))
    grpo.rollout_logprobs = be.logprobs(grpo) * grpo.response_mask
    st = be.train_grpo(grpo)
    result(stage="train", version=be.version,
           grpo={k: v for k, v in st.items() if not k.startswith("moe/tokens_per")})
    lp1 = be.logprobs(lm_batch(fixed))
    stale = vllm_prompt_logprobs(llm, fixed)
    sync = sender.send(be.named_hf_weights(), be.version)
    vl1 = vllm_prompt_logprobs(llm, fixed)
    result(stage="ipc_sync", sync=sync, policy_moved=diff(lp1, lp0), before_sync=diff(lp1, stale),
           after_sync_bf16=diff(lp1, vl1), tolerance_mean_abs=a.tol_mean, tolerance_p99=a.tol_p99,
           passed=diff(lp1, vl1)["mean_abs"] < a.tol_mean and diff(lp1, vl1)["p99_abs"] < a.tol_p99)
    be.save_hf(ck2)
    result(stage="save_hf_v3", vs_transformers_reloaded=diff(lp1, hf_logprobs(ck2, fixed)))
    del be
    gc.collect()
    torch.cuda.empty_cache()
    for recipe in ("delayed", "current"):
        be8 = make_backend(ck2, fp8="hybrid", recipe=recipe)
        be8.logprobs(lm_batch(fixed))  # delayed scaling: first pass fills the amax history
        lp8 = be8.logprobs(lm_batch(fixed))
        result(stage=f"fp8_{recipe}_vs_vllm", learner_fp8_vs_vllm=diff(lp8, vl1),
               learner_fp8_vs_bf16=diff(lp8, lp1))
        del be8
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ step
def write_config(path, **over):
    cfg = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 32768,
           "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 2048,
           "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
           "head_dim": 128, "num_experts": 16, "num_experts_per_tok": 2, "norm_topk_prob": True,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
           "rope_theta": 1000000.0, "torch_dtype": "bfloat16", "hidden_act": "silu",
           "decoder_sparse_step": 1, "mlp_only_layers": [], "bos_token_id": 2, "eos_token_id": 2}
    cfg.update(over)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    return cfg


def flops_per_token(cfg, seq) -> float:
    """Training FLOPs per token: 6 x active matmul params + causal attention (fwd+bwd)."""
    h, L, d = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    attn = h * (nq + 2 * nkv) * d + nq * d * h
    experts = cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"]
    router = h * cfg["num_experts"]
    active = L * (attn + experts + router) + h * cfg["vocab_size"]
    return 6 * active + 6 * L * nq * d * seq  # causal: half of 12 * L * s * h_attn


def cmd_step(a):
    path = os.path.join(a.workdir, "bench_moe")
    cfg = write_config(path, hidden_size=a.hidden, moe_intermediate_size=a.moe_ffn,
                       num_experts=a.experts, num_experts_per_tok=a.topk, num_hidden_layers=a.layers,
                       num_attention_heads=a.hidden // 128)
    fp8 = None if a.fp8 == "none" else "hybrid"
    be = make_backend(path, fp8=fp8, recipe=a.recipe, mbs=a.mbs, init_from_hf=False,
                      old_logprobs="rollout", max_seq_len=a.seq)
    B = a.mbs * a.micro
    ids = torch.randint(3, cfg["vocab_size"], (B, a.seq))
    batch = lm_batch(ids, prompt=a.seq // 4, adv=torch.randn(B))
    times = []
    for i in range(a.warmup + a.iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        st = be.train_grpo(batch)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    step = sum(times) / len(times)
    tokens = B * a.seq
    tflops = flops_per_token(cfg, a.seq) * tokens / step / 1e12
    params = sum(p.numel() for p in be.model.parameters())
    result(stage="step", precision="bf16" if fp8 is None else f"fp8-hybrid/{a.recipe}",
           params_b=params / 1e9, tokens_per_step=tokens, step_s=step, min_step_s=min(times),
           tokens_per_s=tokens / step, model_tflops=tflops, mfu=tflops / peak_tflops(),
           peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9,
           imbalance=st.get("moe/load_imbalance"), loss=st.get("loss"))


# ------------------------------------------------------------------------------------------ grpo
def copy_bandwidth(gb=1.0) -> float:
    n = int(gb * 1e9) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 10
    del x, y
    return gb / dt  # GB moved (read + write counts once, like a weight copy)


def cmd_grpo(a):
    from vllm import SamplingParams

    from learner.batch import collate
    from learner.losses import group_advantages
    from learner.megatron.weight_stream import EngineReceiver, LocalEngine, WeightStreamSender
    path = os.path.join(a.workdir, "grpo_moe")
    cfg = write_config(path, hidden_size=1024, moe_intermediate_size=512, num_experts=32,
                       num_experts_per_tok=4, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=64, vocab_size=32000)
    llm, t_start = start_vllm(path, util=0.3, dummy=True, max_len=1024)
    be = make_backend(path, mbs=16, init_from_hf=False)
    receiver = EngineReceiver(llm)
    sender = WeightStreamSender("ipc", [LocalEngine(receiver)], bucket_bytes=a.bucket_mb << 20)
    first = sender.send(be.named_hf_weights(), be.version)  # vLLM serves the learner's init
    copy_gbs = copy_bandwidth()
    syncs = [sender.send(be.named_hf_weights(), be.version) for _ in range(3)]
    sync_s = min(s["seconds"] for s in syncs)
    result(stage="ipc_sync_bandwidth", engine_start_s=t_start, gb=syncs[0]["bytes"] / 1e9,
           sync_s=sync_s, sync_gb_per_s=syncs[0]["bytes"] / 1e9 / sync_s,
           first_sync_s=first["seconds"], device_copy_gb_per_s=copy_gbs,
           bucket_mb=a.bucket_mb)

    n_prompts, G, plen, gen = a.prompts, a.group, 64, a.gen_len
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, cfg["vocab_size"], (n_prompts, plen), generator=g)
    sp = SamplingParams(n=G, temperature=1.0, max_tokens=gen, ignore_eos=True, logprobs=0,
                        detokenize=False, seed=0)
    for step in range(2):  # step 0 warms up
        ph = {}
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts], sp, use_tqdm=False)
        ph["generate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        p_ids, r_ids, r_lps, rewards = [], [], [], []
        for p, o in zip(prompts, outs):
            for c in o.outputs:
                toks = list(c.token_ids)
                p_ids.append(p.tolist())
                r_ids.append(toks)
                r_lps.append([d[tok].logprob for d, tok in zip(c.logprobs, toks)])
                rewards.append(float(sum(tk % 2 == 0 for tk in toks) / len(toks)))  # toy verifier
        adv = group_advantages(torch.tensor(rewards), G)
        batch = collate(p_ids, r_ids, r_lps, adv.tolist(), pad_id=0)
        ph["reward_and_collate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        st = be.train_grpo(batch)
        ph["train_total_s"] = time.perf_counter() - t
        ph["train_old_logprobs_s"] = st["time/old_logprobs_s"]
        ph["train_fwd_bwd_opt_s"] = st["time/learner_step_s"]
        t = time.perf_counter()
        sync = sender.send(be.named_hf_weights(), be.version)
        ph["weight_sync_s"] = time.perf_counter() - t
        ph["step_total_s"] = sum(v for k, v in ph.items() if k in (
            "generate_s", "reward_and_collate_s", "train_total_s", "weight_sync_s"))
        if step == 1:
            result(stage="grpo_step_colocated", samples=len(r_ids), response_tokens=n_prompts * G * gen,
                   rollout_vs_learner_mismatch=st.get("mismatch_abs"), phases=ph,
                   gen_tokens_per_s=n_prompts * G * gen / ph["generate_s"],
                   sync_gb=sync["bytes"] / 1e9, version=be.version, engine_version=receiver.version)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["check", "step", "grpo"])
    ap.add_argument("--workdir", default="/tmp/aha_megatron")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tol-mean", type=float, default=0.02)
    ap.add_argument("--tol-p99", type=float, default=0.15)
    ap.add_argument("--fp8", default="none", choices=["none", "hybrid"])
    ap.add_argument("--recipe", default="delayed", choices=["delayed", "current"])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--moe-ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--bucket-mb", type=int, default=512)
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    {"check": cmd_check, "step": cmd_step, "grpo": cmd_grpo}[a.cmd](a)


if __name__ == "__main__":
    main()
