"""``reward_model``: a Hugging Face sequence-classification reward model trained with the
Bradley-Terry loss, ``-log sigmoid(r(chosen) - r(rejected))``, on preference pairs, so R1's final
RL stage has a learned reward beside the rule rewards (``reward.weights.reward_model`` with
``reward.options.reward_model.path: {from_stage: <this stage>}``).

Pairs come from ``data.pairs``: a rejection_sample stage (``{from_stage: NAME}``: chosen = a kept,
verified-correct response; rejected = a response to the same prompt that a filter rejected:
wrong, badly formatted, in another language, cut off; see PAIR_REASONS) or a file with
``prompt``, ``chosen``, ``rejected`` columns. The text scored is
``prompt + response``, as ``rewards.reward_model.RewardModelScorer`` scores it in the reward pool.
The model starts from the stage's input checkpoint (its LM head replaced by a one-logit score
head). Pairs of ``heldout_fraction`` of the prompts (by hash) are held out: their pair accuracy is
the stage's result.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random

import ray

log = logging.getLogger(__name__)


def bradley_terry_loss(chosen, rejected):
    """Mean ``-log sigmoid(r_c - r_r)`` over pairs (tensors of rewards)."""
    import torch.nn.functional as F
    return -F.logsigmoid(chosen - rejected).mean()


def pair_accuracy(chosen, rejected) -> float:
    """Share of pairs whose chosen response scores strictly higher."""
    return float((chosen > rejected).float().mean()) if len(chosen) else 0.0


PAIR_REASONS = ("accuracy", "format", "language", "truncated", "length")
"""Rejected samples that make a pair's ``rejected`` side: a wrong answer, a broken format, the
wrong language, a cut-off or out-of-bounds response (not duplicates or capped extras)."""


def build_pairs(kept: list[dict], rejected: list[dict], max_per_prompt: int = 4) -> list[dict]:
    """Pairs of one prompt's kept (verified, well-formed) responses and its rejected ones
    (PAIR_REASONS): up to ``max_per_prompt`` per prompt, each response used about equally often."""
    wrong: dict[str, list[dict]] = {}
    for r in rejected:
        if r.get("reject_reason") in PAIR_REASONS:
            wrong.setdefault(r["prompt_id"], []).append(r)
    right: dict[str, list[dict]] = {}
    for r in kept:
        right.setdefault(r["prompt_id"], []).append(r)
    pairs = []
    for pid, good in right.items():
        bad = wrong.get(pid, [])
        for j in range(min(max(len(good), len(bad)), max_per_prompt) if bad else 0):
            pairs.append({"prompt_id": pid, "prompt": good[0]["prompt"],
                          "chosen": good[j % len(good)]["solution"], "rejected": bad[j % len(bad)]["solution"]})
    return pairs


def load_pairs(src: str) -> list[dict]:
    """Pairs from a rejection_sample stage's dataset folder or a file of prompt/chosen/rejected."""
    import pyarrow.parquet as pq

    if os.path.isdir(os.path.join(src, "kept")):
        return build_pairs(pq.read_table(os.path.join(src, "kept")).to_pylist(),
                           pq.read_table(os.path.join(src, "rejected")).to_pylist())
    from rollout.datasets import read_rows
    rows = read_rows(src)
    missing = {"prompt", "chosen", "rejected"} - set(rows[0] if rows else ())
    if missing:
        raise ValueError(f"data.pairs {src!r}: missing column(s) {', '.join(sorted(missing))}; a pairs "
                         "file has prompt, chosen, rejected")
    return [{"prompt_id": r.get("id", r["prompt"]), **{k: r[k] for k in ("prompt", "chosen", "rejected")}}
            for r in rows]


def split(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held out), held out by prompt: a prompt's pairs are all on one side."""
    def out(p):
        return int(hashlib.sha256(str(p["prompt_id"]).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction
    return [p for p in pairs if not out(p)], [p for p in pairs if out(p)]


@ray.remote
def train_reward_model(base: str, train: list[dict], test: list[dict], steps: int, batch_size: int,
                       lr: float, seed: int, out: str, threads: int, max_length: int = 512) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, torch_dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id

    def scores(prompts, responses):
        enc = tok([p + r for p, r in zip(prompts, responses)], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt", add_special_tokens=False)
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0]

    def batch_scores(batch):
        prompts = [p["prompt"] for p in batch]
        both = scores(prompts + prompts, [p["chosen"] for p in batch] + [p["rejected"] for p in batch])
        return both[:len(batch)], both[len(batch):]

    def heldout() -> dict:
        if not test:
            return {"pair_accuracy": 0.0, "loss": 0.0, "pairs": 0}
        model.eval()
        with torch.inference_mode():
            chosen, rejected = zip(*(batch_scores(test[i:i + 64]) for i in range(0, len(test), 64)))
            c, r = torch.cat(chosen), torch.cat(rejected)
        model.train()
        return {"pair_accuracy": pair_accuracy(c, r), "loss": float(bradley_terry_loss(c, r)), "pairs": len(test)}

    start = heldout()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    order: list[dict] = []
    rows = []
    model.train()
    for step in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(train)
                rng.shuffle(order)
            batch.append(order.pop())
        c, r = batch_scores(batch)
        loss = bradley_terry_loss(c, r)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows.append({"rm_loss": float(loss), "rm_accuracy": pair_accuracy(c.detach(), r.detach())})
    end = heldout()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"rows": rows, "start": start, "end": end}


def run(ctl, i, st, job) -> dict:
    from actors.common import get_all
    from cluster.pipeline import tmp_path

    pairs = load_pairs(job.data.pairs)
    train, test = split(pairs, st.heldout_fraction)
    if not train:
        raise ValueError(f"stage {st.name}: no preference pairs to train on from {job.data.pairs} "
                         f"({len(pairs)} pairs, {len(test)} held out): the rejection stage needs "
                         "prompts with both a correct and a wrong answer (sample more per prompt)")
    final = ctl.checkpoint_dir(st.name)
    tmp = tmp_path(final)
    threads = job.learner.threads if job.learner.threads > 0 else (os.cpu_count() or 1)
    with ctl.timer("train"):
        res = get_all([train_reward_model.options(num_cpus=job.run.learner_cpus, resources=job.run.learner_resources).remote(
            ctl.input_model(i, st), train, test, st.steps, st.batch_size, st.lr or job.learner.lr,
            job.learner.seed + job.run.seed, tmp, threads)], f"stage {st.name} training", job.run.timeout_s)[0]
    t = ctl.timer.pop()
    for step, row in enumerate(res["rows"]):
        ctl.global_step += 1
        ctl.logger.metrics({"stage": st.name, "step": step + 1, **row,
                            **({k: v / max(st.steps, 1) for k, v in t.items()})}, ctl.global_step)
    ctl.commit(i, tmp, final)
    result = {"pairs_train": len(train), "pairs_heldout": len(test),
              "pair_accuracy_start": res["start"]["pair_accuracy"], "pair_accuracy": res["end"]["pair_accuracy"],
              "heldout_loss": res["end"]["loss"]}
    ctl.results.setdefault(st.name, {})["reward_model"] = result
    log.info("stage %s: held-out pair accuracy %.3f (before training %.3f) on %d pairs; %d train pairs",
             st.name, result["pair_accuracy"], result["pair_accuracy_start"], len(test), len(train))
    return {"checkpoint": final}
