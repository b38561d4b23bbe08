"""What aha's vLLM engine start costs, and what a tiny model could skip: one engine per variant,
each in a fresh process, outside Ray.

    python bench/probe_vllm_start.py [--ckpt DIR] [--variants aha,inproc,inproc2]

Variants (same ``LLM(...)`` arguments as ``rollout.engine.VllmEngine``: float32, eager, prefix
caching, processed logprobs, aha's worker extension, 1 GiB KV cache):

- ``aha``: as aha starts it: vLLM's V1 engine core in its own process, and its worker in another
  (the multiprocessing executor), each spawned (``VLLM_WORKER_MULTIPROC_METHOD=spawn``) and
  re-importing torch and vLLM; the worker's OpenMP threads bound to core 0, core 1 reserved.
- ``inproc``: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``distributed_executor_backend="uni"``:
  engine core and worker in the caller's process (no spawn, no IPC busy-polling).
- ``inproc2``: as ``inproc`` with the worker's OpenMP threads on both cores
  (``VLLM_CPU_OMP_THREADS_BIND=0-1``, nothing reserved): what a synchronous step could use.

For each: seconds to ``import vllm``, to construct ``LLM``, the first and the median of 3 later
``generate`` calls of 16 prompts x 8 samples x up to 24 tokens (the demo's request), and the CPU
seconds every process of the engine burns over 3 s of idleness (busy-polling).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = {
    "aha": ({}, {}),
    "inproc": ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, {"distributed_executor_backend": "uni"}),
    "inproc2": ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
                 "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, {"distributed_executor_backend": "uni"}),
}


def child(ckpt: str, variant: str) -> dict:
    t0 = time.time()
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, ROOT)
    import psutil
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    t_import = time.time() - t0

    from rollout.datasets import arithmetic
    from rollout.templates import encode_prompt, render
    t1 = time.time()
    llm = LLM(model=ckpt, tokenizer=ckpt, dtype="float32", seed=0, max_model_len=1024,
              enforce_eager=True, tensor_parallel_size=1, gpu_memory_utilization=0.05,
              enable_prefix_caching=True, logprobs_mode="processed_logprobs",
              worker_extension_cls="rollout.weights.WorkerExtension", **VARIANTS[variant][1])
    t_llm = time.time() - t1
    tok = llm.get_tokenizer()
    recs = arithmetic("train", max_operand=20, heldout_fraction=0.2)
    sp = SamplingParams(n=8, temperature=1.0, top_p=1.0, max_tokens=24, logprobs=0,
                        stop=["</answer>"], include_stop_str_in_output=True)
    gens = []
    for k in range(4):
        prompts = [TokensPrompt(prompt_token_ids=encode_prompt(tok, render("r1_zero_compact", r.question)))
                   for r in recs[16 * k:16 * (k + 1)]]
        t = time.time()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        gens.append(time.time() - t)
        llm.reset_prefix_cache()
    ntok = sum(len(c.token_ids) for o in outs for c in o.outputs)
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    before = {p.pid: sum(p.cpu_times()[:2]) for p in procs}
    time.sleep(3.0)
    idle = {f"{p.pid} {p.name()}": round((sum(p.cpu_times()[:2]) - before[p.pid]) / 3.0, 3)
            for p in procs}
    return {"variant": variant, "import_vllm_s": t_import, "llm_init_s": t_llm,
            "first_generate_s": gens[0], "generate_s_median": statistics.median(gens[1:]),
            "tokens_last_call": ntok, "processes": len(procs),
            "idle_cpu_per_s": idle, "torch_threads_here": __import__("torch").get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=os.path.join(ROOT, "runs", "bench-vs-trl", "sft-300",
                                                   "checkpoints", "0-sft"))
    ap.add_argument("--variants", default="aha,inproc,inproc2")
    ap.add_argument("--_child", default=None)
    a = ap.parse_args()
    if a._child:
        res = child(a.ckpt, a._child)
        with open(os.environ["PROBE_OUT"], "w") as f:
            json.dump(res, f)
        os._exit(0)  # skip vLLM's slow teardown; the parent ends the child's process group
    import signal
    import tempfile
    for v in a.variants.split(","):
        out = tempfile.mktemp(suffix=".json")
        env = dict(os.environ, VLLM_LOGGING_LEVEL="WARNING", PROBE_OUT=out, **VARIANTS[v][0])
        t = time.time()
        with tempfile.TemporaryFile("w+") as logf:
            # its own session: vLLM's engine processes outlive an os._exit of the child, and
            # would keep a pipe open; a file and killing the group after the child ends avoid that
            p = subprocess.Popen([sys.executable, __file__, "--ckpt", a.ckpt, "--_child", v], env=env,
                                 stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
            try:
                p.wait(timeout=600)
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wall = time.time() - t
            if not os.path.exists(out):
                logf.seek(0)
                print(f"{v}: failed (rc {p.returncode})\n{logf.read()[-3000:]}")
                continue
        r = json.load(open(out))
        os.remove(out)
        print(f"{v:>8}: process wall {wall:5.1f}s | import vllm {r['import_vllm_s']:5.1f}s | LLM() "
              f"{r['llm_init_s']:5.1f}s | first generate {r['first_generate_s']:5.2f}s | generate "
              f"{r['generate_s_median']:5.2f}s ({r['tokens_last_call']} tokens) | "
              f"{r['processes']} process(es), idle CPU/s {r['idle_cpu_per_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
