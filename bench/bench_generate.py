"""What vLLM's per-token logprob bookkeeping costs aha's rollout: one in-process engine (as aha
runs it on CPU), the demo's request (16 prompts x 8 samples x up to 24 tokens, stop
``</answer>``), alternating variants call by call in one process:

- ``vllm``:  ``logprobs=0`` as vLLM does it: each sampled token's logprob and its token text
- ``aha``:   ``logprobs=0`` without the token text (``rollout.engine._no_logprob_token_text``)
- ``none``:  no logprobs at all (what aha cannot do: the learner needs them), the floor

    .venv/bin/python bench/bench_generate.py [--ckpt DIR] [--calls 10]

Prints the median seconds per generate call of each variant and its ratio to ``vllm``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=None, help="an HF checkpoint; default: the built-in tiny model")
    ap.add_argument("--calls", type=int, default=10)
    a = ap.parse_args()
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_USE_FLASHINFER_SAMPLER="0",
                      HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    sys.path.insert(0, ROOT)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from rollout.datasets import arithmetic
    from rollout.engine import _no_logprob_token_text
    from rollout.templates import encode_prompt, render
    from rollout.tiny import create_tiny_model

    ckpt = a.ckpt or create_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"), seed=0)
    plain = LogprobsProcessor.__dict__["from_new_request"]
    assert _no_logprob_token_text(), "this vLLM's LogprobsProcessor is not the one aha patches"
    patched = LogprobsProcessor.__dict__["from_new_request"]
    llm = LLM(model=ckpt, tokenizer=ckpt, dtype="float32", seed=0, max_model_len=1024,
              enforce_eager=True, gpu_memory_utilization=0.05, enable_prefix_caching=True,
              logprobs_mode="processed_logprobs", distributed_executor_backend="uni")
    tok = llm.get_tokenizer()
    recs = arithmetic("train", max_operand=20, heldout_fraction=0.2)
    base = dict(n=8, temperature=1.0, top_p=1.0, max_tokens=24, stop=["</answer>"],
                include_stop_str_in_output=True)
    variants = {"vllm": (plain, SamplingParams(logprobs=0, **base)),
                "aha": (patched, SamplingParams(logprobs=0, **base)),
                "none": (plain, SamplingParams(**base))}

    def call(name, k):
        LogprobsProcessor.from_new_request = variants[name][0]
        prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tok, render("r1_zero_compact", r.question)))
                   for r in recs[16 * (k % 20):16 * (k % 20 + 1)]]
        t = time.perf_counter()
        outs = llm.generate(prompts, variants[name][1], use_tqdm=False)
        dt = time.perf_counter() - t
        llm.reset_prefix_cache()
        return dt, sum(len(c.token_ids) for o in outs for c in o.outputs)

    for name in variants:  # first calls hold one-time setup
        call(name, 0)
    times = {name: [] for name in variants}
    tokens = {name: 0 for name in variants}
    for k in range(a.calls):
        for name in variants:
            dt, n = call(name, k)
            times[name].append(dt)
            tokens[name] += n
    ref = statistics.median(times["vllm"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>5}: median {med:.3f} s per call ({min(ts):.3f}-{max(ts):.3f}), "
              f"{tokens[name] / sum(ts):.0f} tokens/s, {med / ref:.2f}x vllm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
