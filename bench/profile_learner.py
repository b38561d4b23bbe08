"""Where aha's learner ``train`` phase goes, outside Ray: one realistic GRPO batch, phase by phase.

    python bench/profile_learner.py [--ckpt DIR] [--batch PARQUET_DIR] [--iters 8] [--threads 1,2]
                                    [--cprofile] [--torch-profile] [demo config overrides ...]

(e.g. ``learner.compute_dtype=float32`` against the demo's ``auto``, bf16 on a CPU with AMX).

Builds the learner exactly as the learner actor does (``learner.torch_backend.TorchBackend`` with
the demo config's ``learner`` section for a GRPO stage: 2 mini-batches,
micro-batch 128, old logprobs recomputed) on the SFT checkpoint that ``bench/bench_vs_trl.py``
caches, and a batch of 128 samples: the trajectories of a finished aha GRPO run when ``--batch``
(or the bench cache) has one (real prompts, responses, engine logprobs, advantages), else the
arithmetic task's gold solutions with made-up logprobs and advantages.

Then, per torch thread count, the median over ``--iters`` of each piece of one ``train`` call, in
the order the controller and the learner actor run them:

- controller side: ``to_arrow`` (Samples -> Arrow) and ``ray.put``-like pickling of the batch;
- actor side: ``from_arrow`` (Arrow -> Samples, a Python loop over rows), ``collate`` (padding, a
  Python loop), the reference forward (with the demo's ``learner.reference: pool`` that of a
  :class:`learner.reference.Reference` as a reference actor runs it, not counted in the learner's
  sum), the old-logprob forward, and per mini-batch the policy
  forward (+ log-softmax / gather), the loss, backward, the no-grad statistics (entropy over
  the full logits, ``float()`` of every stat), and the optimizer step (grad clip + AdamW);
- ``TorchBackend.train_grpo`` end to end, for comparison with the sum of its pieces.

``--cprofile`` prints the top Python functions of ``train_grpo``; ``--torch-profile`` the top
torch operators. Each thread count runs twice: ``learner.share_prompts`` off (``plain``: every row
runs its prompt) and on (``shared``: each distinct prompt once, :mod:`learner.prefix`).
"""
from __future__ import annotations

import argparse
import glob
import os
import pickle
import statistics
import sys
import time
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_samples(ckpt: str, batch_dir: str | None, n: int = 128):
    import random

    from rollout.types import Sample, from_arrow
    if batch_dir:
        import pyarrow.parquet as pq
        parts = sorted(glob.glob(os.path.join(batch_dir, "part-*.parquet")))
        if parts:
            samples = []
            for p in parts[len(parts) // 2:]:  # mid-run steps
                samples += from_arrow(pq.read_table(p))
                if len(samples) >= n:
                    break
            return samples[:n], f"trajectories {batch_dir}"
    from transformers import AutoTokenizer

    from rollout.datasets import arithmetic
    from rollout.templates import encode_prompt, encode_target, render
    tok = AutoTokenizer.from_pretrained(ckpt)
    rng = random.Random(0)
    recs = arithmetic("train", max_operand=20, heldout_fraction=0.2)[:n // 8]
    out = []
    for r in recs:
        p = render("r1_zero_compact", r.question)
        for j in range(8):
            resp = encode_target(tok, r.solution)
            out.append(Sample(prompt_id=r.id, group_index=j, prompt=p, response=r.solution,
                              prompt_ids=encode_prompt(tok, p), response_ids=resp,
                              response_logprobs=[-rng.random() for _ in resp], weight_version=0,
                              answer=r.answer, advantage=rng.gauss(0, 1)))
    return out, "synthetic (gold solutions)"


def profile(ckpt: str, samples, threads: int, iters: int, lcfg) -> dict[str, float]:
    import torch

    from learner.batch import collate
    from learner.losses import grpo_loss, masked_entropy, truncated_is_weight
    from learner.reference import Reference, ReferenceSpec
    from learner.torch_backend import TorchBackend
    from rollout.types import from_arrow, to_arrow

    torch.set_num_threads(threads)
    be = TorchBackend(ckpt, lcfg, temperature=1.0)
    # learner.reference: pool (the demo's): the reference runs in an actor of its own, so its
    # forward is measured as there (a Reference as the reference actor holds it) and train_grpo reads the result
    ref_model = be.reference or Reference(ckpt, ReferenceSpec.of(lcfg, 1.0), "cpu")
    ref_where = "ref forward" + ("" if be.reference else " (reference actor's, off the learner)")
    lc = lcfg.loss
    pad = be.tokenizer.pad_token_id
    times: dict[str, list[float]] = {}

    def t(name, t0):
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return time.perf_counter()

    for it in range(iters + 1):
        c = time.perf_counter()
        arrow = to_arrow(samples)
        c = t("controller: to_arrow", c)
        blob = pickle.dumps(arrow)
        pickle.loads(blob)
        c = t("pickle round trip of the Arrow batch", c)
        s2 = from_arrow(arrow)
        c = t("actor: from_arrow", c)
        batch = collate([s.prompt_ids for s in s2], [s.response_ids for s in s2],
                        [s.response_logprobs for s in s2], [s.advantage for s in s2], pad)
        c = t("actor: collate (pad, Python loop)", c)
        n_mini = lcfg.mini_batches
        bounds = [len(batch) * i // n_mini for i in range(n_mini + 1)]
        with torch.no_grad():
            ref_all = ref_model.logprobs(batch)
            c = t(ref_where, c)
            old_rest = be.logprobs(batch.slice(bounds[1], len(batch)))
            c = t("old-logprob forward (mini-batches 2..)", c)
        for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            mb = batch.slice(lo, hi)
            c = time.perf_counter()
            lp, (logits, lmask) = be._logprobs(be.work, mb, return_logits=True)  # learner.compute_dtype
            c = t("update: forward (+log_softmax/gather)", c)
            ref_lp = ref_all[lo:hi]
            old_lp = lp.detach() if j == 0 else old_rest[lo - bounds[1]:hi - bounds[1]]
            is_w = truncated_is_weight(old_lp, mb.rollout_logprobs, lc.tis_cap)
            mask = mb.response_mask
            loss, st = grpo_loss(lp, old_lp, mb.advantages, mask, lc.clip_low, lc.clip_high, ref_lp,
                                 lc.kl_coef, is_w, lc.aggregation, lc.norm_len or None, lc.clip_ratio_c)
            c = t("update: loss (+float() of stats)", c)
            be._backward(loss)  # into the float32 masters when computing in bf16
            c = t("update: backward", c)
            with torch.no_grad():
                st["entropy"] = masked_entropy(logits, lmask)
                st["logprob_mismatch"] = float(((old_lp - mb.rollout_logprobs).abs() * mask).sum()
                                               / mask.sum().clamp_min(1))
            c = t("update: no-grad stats (entropy, mismatch)", c)
            be._step()
            c = t("update: optimizer (clip_grad_norm + AdamW)", c)
        if be.reference is None:
            batch = replace(batch, ref_logprobs=ref_all)
        c = time.perf_counter()
        be.train_grpo(batch)
        t("TorchBackend.train_grpo end to end", c)
    # per call: mini-batch pieces summed over mini-batches; first iteration dropped (warm-up)
    out = {}
    for k, v in times.items():
        per = len(v) // (iters + 1)
        calls = [sum(v[i * per:(i + 1) * per]) for i in range(iters + 1)][1:]
        out[k] = statistics.median(calls)
    out["_tokens"] = float(batch.attention_mask.sum())
    out["_shape"] = tuple(batch.input_ids.shape)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default=os.path.join(ROOT, "runs", "bench-vs-trl", "sft-300",
                                                   "checkpoints", "0-sft"))
    ap.add_argument("--batch", default=None, help="a trajectories/<stage> folder of an aha run")
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("overrides", nargs="*", help="dotted overrides of the demo config")
    a = ap.parse_args()
    from cluster.cli import DEMO_CONFIG
    from cluster.config import load_config

    cfg = load_config(DEMO_CONFIG, a.overrides)
    lcfg = replace(cfg.learner, seed=cfg.learner.seed + cfg.run.seed)  # a GRPO stage's learner config
    batch_dir = a.batch
    if batch_dir is None:
        found = sorted(glob.glob(os.path.join(ROOT, "runs", "bench-vs-trl", "runs", "*aha1",
                                              "trajectories", "0-grpo")))
        batch_dir = found[-1] if found else None
    samples, where = make_samples(a.ckpt, batch_dir, 128)
    import torch
    print(f"batch: {len(samples)} samples from {where}; torch {torch.__version__}, "
          f"default threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    res = {}
    for th in [int(x) for x in a.threads.split(",")]:
        for share in (False, True):
            res[f"{th}t {'shared' if share else 'plain'}"] = profile(
                a.ckpt, samples, th, a.iters, replace(lcfg, share_prompts=share))
    first = res[next(iter(res))]
    print(f"padded batch {first['_shape']}, {first['_tokens']:.0f} real tokens; "
          f"median seconds per train call over {a.iters} calls")
    keys = [k for k in first if not k.startswith("_")]
    print(f"{'':>46} " + " ".join(f"{th:>12}" for th in res))
    for k in keys:
        print(f"{k:>46} " + " ".join(f"{res[th][k]:>12.4f}" for th in res))
    pieces = [k for k in keys if k != "TorchBackend.train_grpo end to end"
              and not k.startswith(("controller", "pickle")) and "off the learner" not in k]
    print(f"{'sum of actor-side pieces':>46} " + " ".join(f"{sum(res[th][k] for k in pieces):>12.4f}"
                                                          for th in res))
    if a.cprofile or a.torch_profile:
        import cProfile
        import pstats

        from learner.batch import collate
        from learner.torch_backend import TorchBackend
        be = TorchBackend(a.ckpt, lcfg, 1.0)
        batch = collate([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                        [s.response_logprobs for s in samples], [s.advantage for s in samples],
                        be.tokenizer.pad_token_id)
        if be.reference is None:  # learner.reference: pool: the batch brings them
            from learner.reference import Reference, ReferenceSpec
            batch = replace(batch, ref_logprobs=Reference(a.ckpt, ReferenceSpec.of(lcfg, 1.0),
                                                          "cpu").logprobs(batch))
        be.train_grpo(batch)
        if a.cprofile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(3):
                be.train_grpo(batch)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)
        if a.torch_profile:
            from torch.profiler import ProfilerActivity, profile as tprof
            with tprof(activities=[ProfilerActivity.CPU]) as prof:
                be.train_grpo(batch)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
