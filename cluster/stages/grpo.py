"""``grpo``: group-relative policy optimisation, one step in the algorithm's order, one timer per
phase:

    wait_rollout: take G completions for each of ``prompts_per_step`` prompts (generated and scored
                  asynchronously while the previous step trained)
    advantage:    group-relative advantages (learner.shaping.prepare_step)
    train:        one clipped policy-gradient update on every data-parallel learner
    sync:         stream the new weights to every rollout engine

then metrics.jsonl / TensorBoard / Parquet trajectories / terminal (untimed: controller overhead).
The input checkpoint is also the KL reference (in the learner, or in reference actors of its own
with ``learner.reference: pool``).
"""
from __future__ import annotations

import glob
import logging
import os
import time
from collections import Counter
from dataclasses import replace

from actors.learner import LearnerGroup
from actors.rollout import RolloutPool
from actors.stream import RolloutStream
from actors.weight_sync import WeightSync
from cluster.metrics import summary_line
from actors.reference import ReferencePool
from learner.reference import ReferenceSpec
from learner.shaping import prepare_step
from rollout.datasets import fit_prompts
from rollout.types import Sample, to_arrow

log = logging.getLogger(__name__)


def rollout_metrics(samples: list[Sample], learner_version: int) -> dict[str, float]:
    n = max(len(samples), 1)
    comps: dict[str, float] = {}
    for s in samples:
        for k, v in s.reward_components.items():
            comps[k] = comps.get(k, 0.0) + v
    stale = [learner_version - s.weight_version for s in samples]
    reasons = Counter(s.reward_reason for s in samples)
    out = {
        "reward_mean": sum(s.reward for s in samples) / n,
        "accuracy_mean": comps.get("accuracy", 0.0) / n,
        "format_mean": comps.get("format", 0.0) / n,
        "response_len_mean": sum(len(s.response_ids) for s in samples) / n,
        "truncated_frac": sum(s.finish_reason == "length" for s in samples) / n,
        "staleness_mean": sum(stale) / n,
        "staleness_max": max(stale, default=0),
        "reflection_words_mean": sum(s.meta.get("reward_metrics", {}).get("reflection_words", 0)
                                     for s in samples) / n,
    }
    for k, v in comps.items():
        out.setdefault(f"{k}_mean", v / n)
    for r, c in reasons.items():
        out[f"reward_reason/{r}"] = c
    return out


def run(ctl, i, st, job) -> dict:
    from tqdm import tqdm

    from cluster.controller import Cursor, tokenizer

    rc, algo = job.rollout, job.algo
    model_path = ctl.input_model(i, st)
    tok = tokenizer(model_path)  # prompts that can never fit fail here, before any actor starts
    train_set, _ = fit_prompts(ctl.train_records(job), tok,
                               rc.template, rc.max_model_len, rc.max_tokens, "data.train")
    test = ctl.test_prompts(job, tok)
    resumed = ctl.in_stage.get(st.name)  # the stage's last in-stage checkpoint, on --resume
    lcfg = ctl.learner_cfg(st, job)
    # the engines load (the slowest start) while the learner (and the reference actors) load
    rollouts = RolloutPool(model_path, replace(rc, seed=rc.seed + job.run.seed), job.run.rollout_cpus,
                           wait=False, resources=job.run.rollout_resources)
    reference = learners = None
    try:
        learners = LearnerGroup(model_path, lcfg, rc.temperature,
                                job.run.learner_cpus, job.run.timeout_s, job.run.learner_resources)
        if lcfg.loss.kl_coef > 0 and lcfg.reference == "pool":  # the KL reference in actors of its own
            # after the learner, still beside the engines (the slowest to start): on a small
            # machine the engines' start then shares the CPUs with one other actor, not two
            reference = ReferencePool(model_path, ReferenceSpec.of(lcfg, rc.temperature),
                                      lcfg.reference_actors, job.run.reference_cpus,
                                      job.run.reference_resources, job.run.timeout_s, wait=False)
        if resumed:
            learners.load_state(os.path.join(resumed["dir"], "learner"))
        rollouts.wait_ready()
        ctl.rewards.wait_ready()  # started before the stage, beside the engines and the learner
        # the reference actor (started last) is awaited once the first generations are asked for
    except BaseException:
        rollouts.shutdown()
        for pool in (learners, reference):
            if pool is not None:
                pool.shutdown()
        raise
    try:
        sync = WeightSync(learners, rollouts, job.run.timeout_s)
        cursor = Cursor(train_set, job.run.seed, resumed["cursor"] if resumed else 0)
        stream = RolloutStream(rollouts, ctl.rewards, cursor, algo.prompts_per_step, algo.max_staleness,
                               job.run.timeout_s, total_takes=st.steps, admit=sync.admit,
                               reference=reference)
        shaping_totals: Counter = Counter()
        if resumed:  # the engines get the restored weights and version before the first request
            version, first = resumed["version"], resumed["step"]
            sync.push(version)
            stream.takes, stream.next_consumer = first, version
            stream.counts.update(resumed["counts"])
            stream.dropped.update(resumed["dropped"])
            shaping_totals.update(resumed["shaping"])
            ctl.global_step = resumed["global_step"]
            ctl.record_eval(st.name, "start", resumed.get("start_eval") or {})
            log.info("stage %s resumes after step %d (weight version %d, %d prompts drawn)",
                     st.name, first, version, cursor.position)
        else:
            version, first = 0, 0
            ctl.record_eval(st.name, "start", ctl.evaluated.get(model_path)
                            or ctl.evaluate(rollouts, test, job, st.name, 0))
        stream.on_weights_updated(version)  # the first requests: engines generate while ...
        if reference is not None:  # ... the reference actor finishes its start (a failed start
            reference.wait_ready()  # is a clear error here, before any step)
        t_step = time.time()
        bar = tqdm(range(first, st.steps), desc=st.name, dynamic_ncols=True, initial=first, total=st.steps)
        for step in bar:
            with ctl.timer("wait_rollout"):
                groups, info = stream.take(version)
            info["learner_version"] = version  # the version these samples are trained at
            with ctl.timer("advantage"):
                samples, loss_samples, shaping = prepare_step(
                    groups, step + 1, scale_by_std=job.learner.loss.scale_adv_by_std,
                    max_tokens=rc.max_tokens, overlong_buffer=algo.overlong_buffer,
                    overlong_factor=algo.overlong_penalty, truncated=algo.truncated,
                    failed_checks=algo.failed_checks, zero_variance=algo.zero_variance_groups)
            shaping_totals.update(shaping)
            if shaping["zero_variance_groups"] == len(groups):
                log.warning("step %d: all %d groups have equal rewards (advantage 0 everywhere): no "
                            "policy-gradient signal this step%s", step + 1, len(groups),
                            "" if algo.zero_variance_groups == "drop" else
                            " (algo.zero_variance_groups=drop skips such steps)")
            if loss_samples:
                with ctl.timer("train"):
                    train = learners.train_grpo(to_arrow(loss_samples))
                with ctl.timer("sync"):
                    version = train["weight_version"]
                    sync_stats = sync.push(version)
                    stream.on_weights_updated(version)
            else:  # every sample masked: nothing to learn from; the weights stay as they are
                shaping_totals["steps_skipped"] += 1
                log.warning("step %d skipped: every sample was masked from the loss (%s)", step + 1,
                            dict(shaping))
                train, sync_stats = {}, {}
            # logging is the controller's own overhead: untimed, it shows in the next step as
            # time_step_s minus the phases above
            ctl.global_step += 1
            row = step_row(ctl, st, step + 1, version, samples, train, info, stream, sync_stats)
            row.update({"zero_variance_groups": shaping["zero_variance_groups"],
                        "loss_samples": len(loss_samples),
                        **{f"samples_{k}": v for k, v in shaping.items() if k.startswith("masked_")},
                        "steps_skipped": shaping_totals["steps_skipped"],
                        **pool_row(rollouts, ctl.rewards)})
            row["time_step_s"] = time.time() - t_step
            t_step = time.time()
            ctl.logger.metrics(row, ctl.global_step)
            ctl.logger.trajectories(st.name, samples)
            bar.write(summary_line(row))
            ctl.publish(st, step + 1, version, row, pools={"rollout": row["pool_rollout"],
                                                            "reward": row["pool_reward"],
                                                            **pool_row(rollouts, ctl.rewards)})
            if job.eval.every and (step + 1) % job.eval.every == 0 and step + 1 < st.steps:
                with ctl.timer("eval"):
                    ctl.evaluate(rollouts, test, job, st.name, step + 1)
            stop = None
            for req in ctl.requests():
                if req["kind"] == "scale":
                    ctl.ack(req, scale(rollouts, ctl.rewards, req["args"]))
                elif req["kind"] == "stop":
                    stop = req
            every = job.run.checkpoint_every
            if stop is not None or (every and (step + 1) % every == 0 and step + 1 < st.steps):
                with ctl.timer("checkpoint"):
                    path = save_state(ctl, i, st, learners, stream, cursor, step + 1, version, shaping_totals)
            if stop is not None:
                ctl.stopped(stop, st, step + 1, path)  # raises Stopped
        left = stream.close()  # counted: generated but not trained on
        ctl.sample_counts[st.name] = {"generated": stream.counts["generated"],
                                      "trained": stream.counts["trained"],
                                      "reward_retries": stream.counts["reward_retries"],
                                      **dict(stream.dropped), **dict(shaping_totals)}
        log.info("stage %s samples: %s (%d left unused at the end); rollout pool %s", st.name,
                 ctl.sample_counts[st.name], left, rollouts.counts)
        out = ctl.save(i, learners, st.name)
        ctl.record_eval(st.name, "end", ctl.evaluate(rollouts, test, job, st.name, st.steps), out)
        drop_state(ctl, st)
    finally:
        rollouts.shutdown()
        learners.shutdown()
        if reference is not None:
            reference.shutdown()
    return {"checkpoint": out}


def pool_row(rollouts, rewards) -> dict:
    sizes = rollouts.sizes()
    return {"pool_rollout": sizes["serving"], "pool_rollout_starting": sizes["starting"],
            "pool_rollout_retiring": sizes["retiring"], "pool_reward": len(rewards.actors),
            **{f"rollout_engines_{k}": v for k, v in rollouts.counts.items()}}


def scale(rollouts, rewards, args: dict) -> dict:
    """A ``scale`` request (``aha scale JOB rollout=N reward=N``): new engines serve from the next
    weight sync on, removed ones finish their request in flight first."""
    pool, n = args.get("pool"), args.get("n")
    if not isinstance(n, int) or n < 1 or pool not in ("rollout", "reward"):
        return {"ok": False, "message": f"scale needs pool=rollout|reward and n >= 1, got {args}"}
    before = rollouts.sizes()["serving"] if pool == "rollout" else len(rewards.actors)
    try:
        change = rollouts.scale_to(n) if pool == "rollout" else rewards.scale_to(n)
    except RuntimeError as e:
        log.error("scale %s to %d refused: %s", pool, n, e)
        return {"ok": False, "pool": pool, "from": before, "to": before, "message": str(e)}
    log.info("scale %s %d -> %d: %s", pool, before, n, change)
    return {"ok": True, "pool": pool, "from": before, "to": n, **change,
            "message": f"{pool} pool {before} -> {n}" + (" (new engines serve after the next weight sync)"
                                                          if pool == "rollout" and n > before else "")}


def state_dir(ctl, st) -> str:
    return ctl.checkpoint_dir(f"{st.name}-state")


def save_state(ctl, i, st, learners, stream, cursor, step, version, shaping) -> str:
    """What an exact in-stage resume needs (``run.checkpoint_every``, ``aha stop``): the learner's
    state (weights, optimizer, reference, RNG), the data cursor and every counter, written under a
    temporary name and renamed when complete. Samples in flight are not saved: their prompts are
    drawn again on resume (the cursor is set back by them)."""
    import json
    import shutil

    from cluster.pipeline import commit, tmp_path

    final = state_dir(ctl, st)
    tmp = tmp_path(final)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    learners.save_state(os.path.join(tmp, "learner"))
    queued = stream.queued_groups()  # drawn, not trained: drawn again after a resume
    state = {"step": step, "version": version, "global_step": ctl.global_step,
             "cursor": cursor.position - queued, "counts": dict(stream.counts),
             "dropped": dict(stream.dropped), "shaping": dict(shaping),
             "start_eval": ctl.results.get(st.name, {}).get("start"),
             "trajectory_parts": len(glob.glob(os.path.join(ctl.run_dir, "trajectories", st.name, "part-*"))),
             "in_flight_groups": queued}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=1)
    commit(tmp, final, ctl.pipeline.manifest(i))
    log.info("stage %s: in-stage checkpoint at step %d in %s", st.name, step, final)
    return final


def drop_state(ctl, st) -> None:
    import shutil

    if os.path.exists(state_dir(ctl, st)):
        shutil.rmtree(state_dir(ctl, st))


def step_row(ctl, st, step, version, samples, train, info, stream, sync_stats) -> dict:
    reqs = info["requests"]
    gen_time = sum(r.get("time_generate_s", 0.0) for r in reqs)
    gen_tokens = sum(r.get("gen_tokens", 0) for r in reqs)
    dropped = sum(stream.dropped.values())
    row = {"stage": st.name, "step": step, "weight_version": version,
           **rollout_metrics(samples, info["learner_version"]),
           "kl": train.get("kl", 0.0), "clip_frac": train.get("clip_frac", 0.0),
           "entropy": train.get("entropy", 0.0), "samples_dropped": dropped,
           **{f"samples_{k}": v for k, v in stream.dropped.items()},
           "samples_generated": stream.counts["generated"],
           "samples_trained": stream.counts["trained"],
           "reward_retries": stream.counts["reward_retries"],
           **{k: v for k, v in train.items() if k not in ("kl", "clip_frac", "entropy", "weight_version")},
           **ctl.timer.pop(),
           "time_generate_s": gen_time,
           "time_reward_s": sum(r.get("time_reward_s", 0.0) for r in reqs),
           "time_ref_s": sum(r.get("time_ref_s", 0.0) for r in reqs),  # learner.reference: pool
           "gen_tokens_per_s": gen_tokens / gen_time if gen_time else 0.0,
           "sync_bytes": sync_stats.get("sync_bytes", 0.0),
           **{k: v for k, v in sync_stats.items() if k.startswith("sync_") and k != "sync_bytes"}}
    per_engine: dict[int, list[float]] = {}
    for r in reqs:  # tokens/s of each engine that answered this step
        if r.get("time_generate_s"):
            t = per_engine.setdefault(r["engine"], [0.0, 0.0])
            t[0] += r.get("gen_tokens", 0)
            t[1] += r["time_generate_s"]
    for e, (toks, secs) in sorted(per_engine.items()):
        row[f"engine_tokens_per_s/{e}"] = toks / secs
    if per_engine:
        row["gen_tokens_per_s_per_engine"] = sum(t / s for t, s in per_engine.values()) / len(per_engine)
    for r in reqs:  # latest cumulative counters of each reward actor, summed below
        if "reward_pool" in r:
            ctl.reward_counters[r["reward_actor"]] = r["reward_pool"]
    for stats in ctl.reward_counters.values():
        for k, v in stats.items():
            if isinstance(v, (int, float)):
                row[f"reward_pool/{k}"] = row.get(f"reward_pool/{k}", 0.0) + v
    row["time_sync_s"] = row.pop("time_sync_s", 0.0)
    row["time_train_s"] = row.pop("time_train_s", 0.0)
    return row
