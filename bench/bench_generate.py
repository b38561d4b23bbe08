"""What the rollout engine's CPU-side choices cost one ``generate`` call, measured in one process.

One engine built exactly as aha's rollout actor builds it (``rollout.engine.VllmEngine`` with the
demo config: one process, eager, bf16 where the checkpoint is float32), the demo's request (16
prompts x 8 samples x up to 24 tokens, stop ``</answer>``), and variants that switch one thing
at a time *inside that engine*, alternating call by call (so a slower minute of a noisy machine
hits every variant alike):

- ``aha``:        as the engine runs: no text for each logprob's token
                  (``rollout.engine._no_logprob_token_text``)
- ``token_text``: vLLM's logprob bookkeeping as it comes (the text of every logprob's token)
- ``no_logprobs``: no logprobs at all (what aha cannot do: the learner needs them), the floor

    .venv/bin/python bench/bench_generate.py [--ckpt DIR] [--calls 12] [--threads 1]

``--ckpt`` defaults to the SFT checkpoint ``bench/bench_vs_trl.py`` caches (else the built-in tiny
model, untrained). Prints the median seconds per call of each variant and its ratio to ``aha``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHED = os.path.join(ROOT, "runs", "bench-vs-trl", "sft-300", "checkpoints", "0-sft")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=None, help="an HF checkpoint (default: the bench's SFT one, "
                                                 "else the built-in tiny model)")
    ap.add_argument("--calls", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads (an engine actor gets 1)")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # before torch: as Ray sets it for the actor
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.path.insert(0, ROOT)
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from cluster.cli import DEMO_CONFIG
    from cluster.config import load_config
    from rollout.datasets import arithmetic
    from rollout.engine import VllmEngine
    from rollout.templates import encode_prompt, render
    from rollout.tiny import create_tiny_model

    ckpt = a.ckpt or (CACHED if os.path.exists(CACHED) else
                      create_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"), seed=0))
    rc = load_config(DEMO_CONFIG, []).rollout
    engine = VllmEngine(ckpt, rc)
    llm, tok = engine.llm, engine.tokenizer
    patched = LogprobsProcessor.__dict__["from_new_request"]
    plain = classmethod(patched.__func__.vllm_from_new_request)

    print(f"checkpoint {ckpt}; engine dtype {engine.dtype}; OMP threads {a.threads}")
    recs = arithmetic("train", max_operand=20, heldout_fraction=0.2)
    params = {"aha": engine._sampling(rc.group_size), "token_text": engine._sampling(rc.group_size)}
    params["no_logprobs"] = params["aha"].clone()
    params["no_logprobs"].logprobs = None

    def call(name: str, k: int) -> tuple[float, int]:
        LogprobsProcessor.from_new_request = plain if name == "token_text" else patched
        prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tok, render(rc.template, r.question, tok)))
                   for r in recs[16 * (k % 20):16 * (k % 20 + 1)]]
        t = time.perf_counter()
        outs = llm.generate(prompts, params[name], use_tqdm=False)
        dt = time.perf_counter() - t
        llm.reset_prefix_cache()
        return dt, sum(len(c.token_ids) for o in outs for c in o.outputs)

    variants = list(params)
    for name in variants:  # first calls hold one-time setup
        call(name, 0)
    times = {name: [] for name in variants}
    tokens = {name: 0 for name in variants}
    for k in range(a.calls):
        for name in variants:
            dt, n = call(name, k)
            times[name].append(dt)
            tokens[name] += n
    ref = statistics.median(times["aha"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>10}: median {med:.3f} s per call ({min(ts):.3f}-{max(ts):.3f}), "
              f"{tokens[name] / sum(ts):.0f} tokens/s, {med / ref:.2f}x aha")
    return 0


if __name__ == "__main__":
    sys.exit(main())
