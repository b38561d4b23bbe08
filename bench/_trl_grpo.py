"""TRL side of ``bench/bench_vs_trl.py``: Hugging Face TRL's GRPOTrainer on aha's job.

Runs inside the benchmark's own TRL virtual environment (``runs/bench-vs-trl/trl-venv``, made by
``bench_vs_trl.py``; TRL is never part of aha's lock), not aha's. It reads ``job.json`` (written by
``bench_vs_trl.py`` from aha's demo config: the SFT checkpoint, rendered prompts and answers, and the
GRPO hyper-parameters) and writes ``result.json``: the wall-clock time of every optimizer step, the
time spent in generation / scoring, and the thread count.

Same job as aha's GRPO stage:
- model: the SFT checkpoint aha wrote (Hugging Face format; its tokenizer is a ``Qwen2Tokenizer``,
  so no adapter is needed), float32, no gradient checkpointing; ``--bf16`` turns on TRL's own
  mixed precision (``GRPOConfig(bf16=True)``, TRL's default: the Trainer's bf16 autocast), as
  aha's ``learner.compute_dtype: bfloat16`` is; without it TRL computes in float32;
- prompts: aha's arithmetic train split rendered with aha's template (done on the aha side);
- G = ``group_size`` samples of each of ``prompts_per_step`` prompts per GRPO step, at most
  ``max_tokens`` new tokens, temperature 1, top_p 1, generation stops after ``</answer>`` (aha's stop
  string; a single token of the char-level tokenizer, so it is declared an end-of-sequence id) or EOS;
- rewards: aha's accuracy (1.0) and format (0.1). ``rewards/format.py`` and ``rewards/extract.py``
  are aha's own pure-string modules, loaded by file path (aha's ``rewards`` package needs
  math-verify and more, which this environment does not have); the accuracy comparison of an
  extracted answer with the integer gold answer is re-implemented here as aha's
  ``rewards.verifiers.fast_math_check`` does it (integers decide both ways; other plain numbers by
  exact value; what aha would send to math-verify scores 0 here);
- loss: the PPO clip ``clip_low`` / ``clip_high`` (TRL's epsilon / epsilon_high), KL coefficient
  (beta) with a frozen reference, ``loss_type="grpo"`` (= aha's seq_mean_token_mean), std-scaled
  group advantages, truncated completions masked (aha's ``algo.truncated: mask``);
- update: ``mini_batches`` optimizer steps per GRPO batch (TRL: per_device_train_batch_size =
  batch / mini_batches, steps_per_generation = mini_batches), so TRL, like aha, takes old
  logprobs with one extra forward before the first update; AdamW with aha's lr, betas, weight
  decay and grad clip, constant learning rate.

One "GRPO step" here is one generation batch: ``mini_batches`` optimizer steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
from fractions import Fraction

T_CHILD = time.time()


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_INT = re.compile(r"[+-]?\d{1,400}")
_NUM = re.compile(r"[+-]?(\d{1,400}(\.\d{0,400})?|\.\d{1,400})(/\d{1,400})?")


def accuracy_of(extract, gold: str, response: str) -> float:
    pred, why = extract.extract_answer(response)
    if pred is None:
        return 0.0
    g, p = gold.strip(), pred.strip()
    if _INT.fullmatch(g) and _INT.fullmatch(p):
        return float(int(g) == int(p))
    if _NUM.fullmatch(g) and _NUM.fullmatch(p):
        try:
            return float(Fraction(g) == Fraction(p))
        except (ValueError, ZeroDivisionError):
            return 0.0
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", action="store_true", help="TRL's bf16 mixed precision (its default)")
    a = ap.parse_args()
    job = json.load(open(a.job))
    t_spawn = float(os.environ.get("BENCH_T_SPAWN", T_CHILD))
    events = [("child_start", T_CHILD)]

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    events.append(("imports_done", time.time()))

    fmt = _load(os.path.join(job["aha_root"], "rewards", "format.py"), "aha_format")
    extract = _load(os.path.join(job["aha_root"], "rewards", "extract.py"), "aha_extract")

    def accuracy(prompts, completions, answer, **kw):
        return [accuracy_of(extract, g, c) for g, c in zip(answer, completions)]

    def format_reward(prompts, completions, **kw):
        return [fmt.format_score(c)[0] for c in completions]

    ckpt = job["checkpoint"]
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    # aha's engine stops at its stop strings (``</answer>``, kept in the output); here each stop
    # string that is one token becomes an end-of-sequence id (TRL masks after the first eos id)
    eos = [tok.eos_token_id]
    for s in job["stop"]:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise SystemExit(f"stop string {s!r} is {len(ids)} tokens; this script handles 1-token stops")
        eos.append(ids[0])
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    events.append(("model_loaded", time.time()))

    rows = [json.loads(line) for line in open(job["prompts"])]
    ds = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    n_batch = job["prompts_per_step"] * job["group_size"]
    mini = job["mini_batches"]
    if n_batch % mini:
        raise SystemExit(f"batch {n_batch} is not divisible by mini_batches {mini}")
    cfg = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(a.out), "trl-out"),
        per_device_train_batch_size=n_batch // mini, steps_per_generation=mini,
        gradient_accumulation_steps=1, num_generations=job["group_size"], num_iterations=1,
        max_completion_length=job["max_tokens"], temperature=job["temperature"], top_p=1.0,
        learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=job["betas"][0], adam_beta2=job["betas"][1], weight_decay=job["weight_decay"],
        max_grad_norm=job["grad_clip"], beta=job["kl_coef"], epsilon=job["clip_low"],
        epsilon_high=job["clip_high"], loss_type=job["loss_type"], scale_rewards="group",
        mask_truncated_completions=job["mask_truncated"], reward_weights=[1.0 * job["w_accuracy"],
                                                                          1.0 * job["w_format"]],
        max_steps=job["steps"] * mini, logging_steps=1, report_to="none", save_strategy="no",
        bf16=a.bf16, fp16=False, gradient_checkpointing=False, use_cpu=True, use_vllm=False,
        seed=job["seed"], dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
    )

    step_ends: list[float] = []
    timings: dict[str, list[float]] = {"generate_and_score": [], "generate": []}

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, *args, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kw)
            timings["generate_and_score"].append(time.perf_counter() - t0)
            return out

        def _generate(self, *args, **kw):
            t0 = time.perf_counter()
            out = super()._generate(*args, **kw)
            timings["generate"].append(time.perf_counter() - t0)
            return out

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            events.append(("train_begin", time.time()))

        def on_step_end(self, args, state, control, **kw):
            step_ends.append(time.time())

    trainer = Timed(model=model, reward_funcs=[accuracy, format_reward], args=cfg, train_dataset=ds,
                    processing_class=tok, callbacks=[StepTimes()])
    events.append(("trainer_built", time.time()))
    trainer.train()
    events.append(("train_end", time.time()))

    grpo_ends = step_ends[mini - 1::mini]  # one GRPO step = one generation batch = `mini` updates
    begin = dict(events)["train_begin"]
    steps = [e - s for s, e in zip([begin] + grpo_ends[:-1], grpo_ends)]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    out = {
        "system": "trl_bf16" if a.bf16 else "trl", "t_spawn": t_spawn, "events": events, "step_s": steps,
        "first_step_end": grpo_ends[0] if grpo_ends else None,
        "samples_per_step": n_batch,
        "generate_and_score_s": timings["generate_and_score"], "generate_s": timings["generate"],
        "torch_threads": torch.get_num_threads(),
        "reward_mean": [h.get("reward") for h in logs][::1],
        "completion_len_mean": [h.get("completions/mean_length") for h in logs],
        "versions": {m: __import__(m).__version__ for m in ("trl", "transformers", "torch",
                                                            "accelerate", "datasets")},
    }
    with open(a.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
