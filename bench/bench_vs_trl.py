"""aha's GRPO step against Hugging Face TRL's GRPOTrainer on the same tiny job, side by side.

    python bench/bench_vs_trl.py [--rounds 3] [--steps 30] [--sft-steps 300] [--cache DIR]
                                 [--systems trl,aha1,aha0] [aha dotted overrides ...]

What it does, in order (everything it makes is cached under ``--cache``, default
``runs/bench-vs-trl``, which git ignores):

1. **TRL's own virtual environment** ``<cache>/trl-venv``: ``trl==1.16.0`` with exact pins of
   transformers / torch / accelerate / datasets (``TRL_PINS``; the same transformers and torch as
   aha's lock), installed from the package index by pip. It is never part of aha's
   ``requirements/cpu-lock.txt``. Rebuilt only when the pins change (``<cache>/trl-venv/.pins``);
   ``<cache>/trl-venv/freeze.txt`` records everything pip resolved.
2. **One SFT checkpoint** of the demo's tiny model, made by aha's own SFT stage (the demo's first
   stage, ``--sft-steps`` steps): ``<cache>/sft-<steps>/checkpoints/0-sft``, a Hugging Face
   checkpoint (``TorchBackend.save_hf``: safetensors + config + the char-level ``Qwen2Tokenizer``)
   that transformers and TRL load as they are. Both systems start GRPO from it, and use it as the
   frozen KL reference.
3. **The prompts**: aha's arithmetic train split (``rollout.datasets.arithmetic`` with the demo's
   seed, operands and held-out fraction) rendered with the demo's template (``r1_zero_compact``),
   written once for TRL as ``<cache>/prompts.jsonl``; aha's run generates the same records itself.
4. **Alternating runs**, ``--rounds`` times: TRL, aha ``algo.max_staleness=1``, aha
   ``max_staleness=0``, each a fresh process (so start-up is measured the same way for both:
   from the parent's spawn to the end of the first GRPO step). aha runs the demo config with
   ``model.path=<the SFT checkpoint>``, one GRPO stage of ``--steps`` steps and no evaluation
   (``eval.num_prompts=0``; TRL evaluates nothing either); see ``bench/_trl_grpo.py`` for how TRL
   is set up to match (batch, G, max tokens, stop, rewards, lr, KL beta, clip, loss aggregation,
   optimizer steps per batch).
5. **The table**: per system, the median over rounds of the median step (first GRPO step dropped:
   it holds warm-up), samples/s (samples of steps 2..N over their wall time), start to first step,
   each with the range over rounds, and the ratio aha / TRL. Then a phase table: aha's controller
   phases (``metrics.jsonl``) and TRL's generation and scoring time. Raw results are appended to
   ``<cache>/results.jsonl``.

aha runs also record a start-up timeline (wall clock of process start, imports, Ray init, reward
pool, learner group, rollout pool, weight-sync group, first step) and the thread settings of every
process of the job (``torch.get_num_threads()`` in the learner and reward actors, each process's
thread count, ``OMP_NUM_THREADS`` and CPU affinity); ``--timeline`` prints them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

T_CHILD = time.time()
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TRL_PINS = ["trl==1.16.0", "transformers==5.19.0", "torch==2.13.0+cpu", "accelerate==1.16.0",
            "datasets==5.2.0"]
TRL_SYSTEMS = ("trl", "trl_bf16")  # TRL in float32; with its bf16 mixed precision (its default)
LOSS_TYPES = {"seq_mean_token_mean": "grpo", "token_mean": "dapo", "seq_mean_token_sum_norm": "dr_grpo"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- 1. TRL's environment ------------------------------------------------------------------------
def ensure_trl_venv(cache: str) -> str:
    venv = os.path.join(cache, "trl-venv")
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".pins")
    want = "\n".join(TRL_PINS)
    if os.path.exists(stamp) and open(stamp).read() == want and os.path.exists(py):
        return py
    log(f"creating TRL's virtual environment {venv} ({' '.join(TRL_PINS)})")
    t0 = time.time()
    if os.path.exists(venv):
        import shutil
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    freeze = subprocess.run([py, "-m", "pip", "freeze"], check=True, capture_output=True, text=True)
    with open(os.path.join(venv, "freeze.txt"), "w") as f:
        f.write(freeze.stdout)
    with open(stamp, "w") as f:
        f.write(want)
    log(f"TRL environment ready in {time.time() - t0:.0f}s")
    return py


# ---- 2. the SFT checkpoint -----------------------------------------------------------------------
def demo_config(overrides: list[str] = ()):
    from cluster.cli import DEMO_CONFIG
    from cluster.config import load_config
    return DEMO_CONFIG, load_config(DEMO_CONFIG, list(overrides))


def ensure_sft(cache: str, sft_steps: int, overrides: list[str]) -> str:
    import yaml

    config, _ = demo_config(overrides)
    name = f"sft-{sft_steps}"
    ckpt = os.path.join(cache, name, "checkpoints", "0-sft")
    if os.path.exists(os.path.join(ckpt, "model.safetensors")):
        return ckpt
    stages = yaml.safe_load(open(config))["stages"]
    sft = dict(next(s for s in stages if s["type"] == "sft"), steps=sft_steps)
    flow = "{" + ", ".join(f"{k}: {v}" for k, v in sft.items()) + "}"
    cmd = [sys.executable, "-m", "cluster.cli", "train", config, f"stages=[{flow}]",
           f"run.root={cache}", f"run.name={name}", "run.if_exists=overwrite", "eval.num_prompts=0",
           "run.tensorboard=false", *overrides]
    log(f"making the SFT checkpoint: {' '.join(cmd[2:])}")
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    log(f"SFT checkpoint {ckpt} in {time.time() - t0:.0f}s")
    return ckpt


# ---- 3. the job as TRL sees it -------------------------------------------------------------------
def write_trl_job(cache: str, ckpt: str, steps: int, overrides: list[str]) -> str:
    from rollout.datasets import arithmetic
    from rollout.templates import render

    _, cfg = demo_config(overrides)
    if cfg.data.train != "arithmetic":
        raise SystemExit("this benchmark builds TRL's prompts from the built-in arithmetic task")
    recs = arithmetic("train", seed=cfg.data.seed + cfg.run.seed, max_operand=cfg.data.max_operand,
                      heldout_fraction=cfg.data.heldout_fraction)
    prompts = os.path.join(cache, "prompts.jsonl")
    with open(prompts, "w") as f:
        for r in recs:
            f.write(json.dumps({"prompt": render(cfg.rollout.template, r.question),
                                "answer": r.answer}) + "\n")
    lc, rc = cfg.learner.loss, cfg.rollout
    if set(cfg.reward.weights) != {"accuracy", "format"}:
        raise SystemExit(f"TRL side implements accuracy + format only, config has {cfg.reward.weights}")
    job = {"aha_root": ROOT, "checkpoint": os.path.abspath(ckpt), "prompts": os.path.abspath(prompts),
           "steps": steps, "prompts_per_step": cfg.algo.prompts_per_step, "group_size": rc.group_size,
           "max_tokens": rc.max_tokens, "temperature": rc.temperature, "stop": list(rc.stop),
           "lr": cfg.learner.lr, "betas": list(cfg.learner.betas),
           "weight_decay": cfg.learner.weight_decay, "grad_clip": cfg.learner.grad_clip,
           "kl_coef": lc.kl_coef, "clip_low": lc.clip_low, "clip_high": lc.clip_high,
           "loss_type": LOSS_TYPES[lc.aggregation], "mask_truncated": cfg.algo.truncated == "mask",
           "mini_batches": cfg.learner.mini_batches, "w_accuracy": cfg.reward.weights["accuracy"],
           "w_format": cfg.reward.weights["format"], "seed": cfg.run.seed}
    path = os.path.join(cache, "trl-job.json")
    with open(path, "w") as f:
        json.dump(job, f, indent=1)
    return path


# ---- 4. the runs ---------------------------------------------------------------------------------
def wait_idle(max_wait: float, threshold: float = 15.0) -> float:
    """Wait (up to ``max_wait`` s) until the machine's CPU use over 3 s is below ``threshold`` %:
    on 2 cores anything else running (a test suite, a demo) distorts every number here. Returns the
    last reading; the run records it."""
    import psutil

    t0 = time.time()
    while True:
        busy = psutil.cpu_percent(interval=3.0)
        if busy < threshold or time.time() - t0 > max_wait:
            if busy >= threshold:
                log(f"machine still {busy:.0f}% busy after {max_wait:.0f}s; running anyway")
            return busy
        log(f"machine {busy:.0f}% busy (other processes); waiting")
        time.sleep(10)


def run_child(cmd: list[str], out: str, logfile: str, timeout: float) -> dict:
    env = dict(os.environ, BENCH_T_SPAWN=repr(time.time()), PYTHONUNBUFFERED="1")
    with open(logfile, "w") as lf:
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=lf, stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode != 0 or not os.path.exists(out):
        tail = open(logfile).read()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (rc {p.returncode}); log {logfile}:\n{tail}")
    return json.load(open(out))


def run_trl(py: str, job: str, cache: str, tag: str, timeout: float, bf16: bool = False) -> dict:
    d = os.path.join(cache, "results", tag)
    os.makedirs(d, exist_ok=True)
    out = os.path.join(d, "result.json")
    if os.path.exists(out):
        os.remove(out)
    return run_child([py, os.path.join(HERE, "_trl_grpo.py"), "--job", job, "--out", out,
                      *(["--bf16"] if bf16 else [])], out, os.path.join(d, "log.txt"), timeout)


def run_aha(ckpt: str, staleness: int, steps: int, cache: str, tag: str, overrides: list[str],
            timeout: float) -> dict:
    d = os.path.join(cache, "results", tag)
    os.makedirs(d, exist_ok=True)
    out = os.path.join(d, "result.json")
    if os.path.exists(out):
        os.remove(out)
    ov = [f"model.path={os.path.abspath(ckpt)}", f"stages=[{{type: grpo, steps: {steps}}}]",
          f"algo.max_staleness={staleness}", f"run.root={os.path.abspath(cache)}/runs",
          f"run.name={tag}", "run.if_exists=overwrite", "eval.num_prompts=0",
          "run.tensorboard=false", *overrides]
    return run_child([sys.executable, os.path.abspath(__file__), "_aha", "--out", out, *ov], out,
                     os.path.join(d, "log.txt"), timeout)


# ---- the aha child: one GRPO job in this process, instrumented --------------------------------
def _thread_report(extra: dict) -> list[dict]:
    """Every process of this job (this one and its descendants: Ray workers, vLLM's engine core):
    name, threads, OMP_NUM_THREADS, CPU affinity, plus torch threads where an actor told us."""
    import psutil

    me = psutil.Process()
    out = []
    for p in [me, *me.children(recursive=True)]:
        try:
            cmd = " ".join(p.cmdline())[:120]
            env = p.environ()
            out.append({"pid": p.pid, "name": p.name(), "cmd": cmd, "threads": p.num_threads(),
                        "omp": env.get("OMP_NUM_THREADS"), "affinity": p.cpu_affinity(),
                        "cpu_s": sum(p.cpu_times()[:2]), **extra.get(p.pid, {})})
        except (psutil.Error, OSError):
            continue
    return out


def _cpu_per_step(reports: list, step_ends: list[float]) -> dict:
    """CPU seconds per GRPO step of each process between the end of step 2 and the last step,
    and the wall seconds per step over the same span (2 cores: at most 2 CPU-s per wall-s)."""
    if len(reports) < 2 or len(step_ends) < 3:
        return {}
    a, b = ({p["pid"]: p for p in r} for r in reports[:2])
    n = len(step_ends) - 2
    out = {"wall_s": (step_ends[-1] - step_ends[1]) / n}
    for pid, p in b.items():
        if pid in a:
            name = p.get("role") or p["name"]
            out[f"{pid} {name}"] = (p["cpu_s"] - a[pid]["cpu_s"]) / n
    return out


def aha_child(out: str, overrides: list[str]) -> int:
    t_spawn = float(os.environ.get("BENCH_T_SPAWN", T_CHILD))
    events: list[tuple[str, float, float]] = []  # (what, start, end), wall clock
    events.append(("python start -> bench main", t_spawn, T_CHILD))
    t0 = time.time()
    import ray

    import actors.reward as ar
    import cluster.controller as cc
    import cluster.metrics as cm
    from cluster.config import load_config
    from cluster.cli import DEMO_CONFIG
    # what `aha train` imports before Ray starts (no torch: the tokenizer's prefetch thread imports
    # it beside ray.init); the stages' modules are imported after, as `Controller.run` does
    events.append(("import aha's driver (ray, config, controller)", t0, time.time()))

    def timed(owner, attr: str, label: str, after=None):
        orig = getattr(owner, attr)

        def wrapper(*a, **k):
            s = time.time()
            r = orig(*a, **k)
            events.append((label, s, time.time()))
            if after is not None:
                after(a[0] if a else None)
            return r
        setattr(owner, attr, wrapper)

    probes: dict = {}

    def torch_threads(handle):
        t_probe = time.time()
        try:
            return _torch_threads(handle)
        finally:
            events.append(("(bench's own probe of actor threads, not aha)", t_probe, time.time()))

    def _torch_threads(handle):
        def f(self):
            import os as _os

            import torch
            return _os.getpid(), torch.get_num_threads(), torch.get_num_interop_threads()
        try:
            pid, n, inter = ray.get(handle.__ray_call__.remote(f), timeout=60)
            return pid, {"torch_threads": n, "torch_interop_threads": inter}
        except Exception as e:  # noqa: BLE001 - diagnostics only
            return None, {"error": repr(e)}

    pools: dict = {}  # probed after the last step, so the probes never delay start-up or a step

    def keep(role):
        return lambda obj: pools.__setitem__(role, obj)

    def probe_actors():
        for role, pool in pools.items():
            pid, info = torch_threads(pool.actors[0])
            probes[pid] = dict(info, role=role)
        if "rollout actor (vLLM LLM front end)" in pools:
            probes["engine_start_s"] = pools["rollout actor (vLLM LLM front end)"].start_s

    def wrap_stage_modules():
        import actors.learner as al
        import actors.reference as aref
        import actors.rollout as aro
        import actors.weight_sync as aw
        import cluster.stages.grpo as cg
        timed(al.LearnerGroup, "__init__", "learner group start (actor + 2 models)", keep("learner"))
        timed(aro.RolloutPool, "__init__", "rollout pool start (vLLM engine)",
              keep("rollout actor (vLLM LLM front end)"))
        if hasattr(aro.RolloutPool, "wait_ready"):  # engines started without waiting, then awaited
            timed(aro.RolloutPool, "wait_ready", "rollout pool: wait for the vLLM engine")
        timed(aref.ReferencePool, "wait_ready", "reference pool: wait for the reference actor")
        timed(aw.WeightSync, "__init__", "weight-sync group setup")
        timed(cg, "fit_prompts", "driver: fit_prompts (tokenize every prompt)")

    timed(ar.RewardPool, "__init__", "reward pool start", keep("reward"))
    timed(cc.Controller, "model_path", "model path")
    timed(cc.Controller, "_start_control", "job control actor (aha status/scale/stop)")
    timed(cc, "tokenizer", "driver: AutoTokenizer.from_pretrained (awaits the prefetch)")
    step_ends: list[float] = []
    threads_at_step: list = []
    orig_metrics = cm.RunLogger.metrics

    def metrics(self, row, global_step):
        step_ends.append(time.time())
        if len(step_ends) == n_steps:  # after the last timed step: the probes delay nothing
            probe_actors()
        if len(step_ends) == 2 or len(step_ends) == n_steps:  # steady state: steps 2..N
            threads_at_step.append(_thread_report(probes))
        return orig_metrics(self, row, global_step)
    cm.RunLogger.metrics = metrics

    cfg = load_config(DEMO_CONFIG, overrides)
    n_steps = sum(st.steps for st in cfg.stages if st.type == "grpo")
    t = time.time()
    ctl = cc.Controller(cfg)
    events.append(("controller init (run dir)", t, time.time()))
    if hasattr(ctl, "prefetch"):  # as `aha train` does: the tokenizer loads while Ray starts
        ctl.prefetch()
    t = time.time()
    cc.start_ray(cfg)
    events.append(("ray.init (local cluster)", t, time.time()))
    t = time.time()
    wrap_stage_modules()
    events.append(("import aha's stages (torch, ...; Controller.run does it here)", t, time.time()))
    t_run = time.time()
    ctl.run()
    t_end = time.time()
    ray.shutdown()
    with open(os.path.join(ctl.run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows = [r for r in rows if r["stage"].endswith("grpo")]
    events.sort(key=lambda e: e[1])
    res = {"system": f"aha_s{cfg.algo.max_staleness}", "t_spawn": t_spawn, "events": events,
           "t_run": t_run, "t_end": t_end, "step_ends": step_ends,
           "first_step_end": step_ends[0] if step_ends else None,
           "step_s": [r["time_step_s"] for r in rows],
           "samples_per_step": cfg.algo.prompts_per_step * cfg.rollout.group_size,
           "phases": {k: [r.get(k, 0.0) for r in rows] for k in
                      ("time_wait_rollout_s", "time_advantage_s", "time_train_s", "time_sync_s",
                       "time_generate_s", "time_reward_s", "gen_tokens_per_s", "loss_samples",
                       "reward_mean", "response_len_mean")},
           "threads": threads_at_step[-1] if threads_at_step else [],
           "cpu_per_step": _cpu_per_step(threads_at_step, step_ends),
           "engine_start_s": probes.get("engine_start_s")}
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


# ---- 5. the table --------------------------------------------------------------------------------
def summarize(r: dict) -> dict:
    steps = r["step_s"][1:] or r["step_s"]  # the first step holds warm-up
    out = {"median step (s)": statistics.median(steps),
           "samples/s": r["samples_per_step"] * len(steps) / sum(steps),
           "start to first step (s)": r["first_step_end"] - r["t_spawn"]}
    if r["system"] in TRL_SYSTEMS:
        gs = r["generate_and_score_s"][1:] or r["generate_and_score_s"]
        g = r["generate_s"][1:] or r["generate_s"]
        out["TRL generate (s)"] = statistics.median(g)
        out["TRL score+old/ref logprobs (s)"] = statistics.median(
            [a - b for a, b in zip(gs, g)])
        out["TRL update (s)"] = out["median step (s)"] - statistics.median(gs)
    else:
        for k, v in r["phases"].items():
            v = v[1:] or v
            out[f"aha {k}"] = statistics.median(v)
    return out


def table(results: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["system"], []).append(summarize(r))
    names = sorted(by, key=lambda n: (n not in TRL_SYSTEMS, "+" in n, n != "aha_s1", n))  # TRL, aha_s1, aha_s0, variants
    med = {n: {k: statistics.median(s[k] for s in by[n]) for k in by[n][0]} for n in names}
    rng = {n: {k: (min(s[k] for s in by[n]), max(s[k] for s in by[n])) for k in by[n][0]}
           for n in names}
    lines = []
    head = ["median step (s)", "samples/s", "start to first step (s)"]
    w = max(10, *(len(n) + 4 for n in names))
    lines.append(f"{'':>{w}} | " + " | ".join(f"{h:>27}" for h in head) + " | rounds")
    for n in names:
        cells = [f"{med[n][h]:7.2f} ({rng[n][h][0]:.2f}-{rng[n][h][1]:.2f})" for h in head]
        lines.append(f"{n:>{w}} | " + " | ".join(f"{c:>27}" for c in cells) + f" | {len(by[n])}")
    for t in (t for t in TRL_SYSTEMS if t in med):
        for n in (n for n in names if n not in TRL_SYSTEMS):
            cells = [f"{med[n][h] / med[t][h]:7.2f}x" for h in head]
            lines.append(f"{n + '/' + t:>{w}} | " + " | ".join(f"{c:>27}" for c in cells) + " |")
    for n in names:  # each variant's asynchronous run against its synchronous one
        sync = n.replace("aha_s1", "aha_s0", 1)
        if n.startswith("aha_s1") and sync in med:
            lines.append(f"async speed-up (samples/s {n} / {sync}): "
                         f"{med[n]['samples/s'] / med[sync]['samples/s']:.2f}x")
    lines.append("")
    lines.append("phases, median seconds per step (medians over rounds)")
    for n in names:
        extra = {k: v for k, v in med[n].items() if k not in head}
        lines.append(f"  {n}: " + ", ".join(f"{k.replace('aha ', '').replace('TRL ', '')} "
                                            f"{v:.3f}" for k, v in extra.items()))
    return "\n".join(lines)


def timeline(r: dict) -> str:
    t0 = r["t_spawn"]
    lines = [f"start-up of {r['system']} (seconds from spawn)"]
    for what, s, e in r["events"]:
        lines.append(f"  {s - t0:7.2f} -> {e - t0:7.2f}  ({e - s:6.2f}s)  {what}")
    if r.get("first_step_end"):
        lines.append(f"  first GRPO step ends at {r['first_step_end'] - t0:.2f}s "
                     f"(step itself {r['step_s'][0]:.2f}s)")
    if r.get("engine_start_s") is not None:
        lines.append(f"  vLLM engine's own start (VllmEngine.start_s): {r['engine_start_s']:.1f}s")
    cps = r.get("cpu_per_step") or {}
    if cps:
        busy = {k: v for k, v in cps.items() if k != "wall_s" and v >= 0.005}
        lines.append(f"  CPU seconds per GRPO step, steady state ({cps['wall_s']:.2f} wall s per step, "
                     f"{sum(busy.values()):.2f} CPU s in all): " +
                     ", ".join(f"{k} {v:.2f}" for k, v in sorted(busy.items(), key=lambda kv: -kv[1])))
    for p in r.get("threads", []):
        extra = {k: p[k] for k in ("role", "torch_threads", "torch_interop_threads") if k in p}
        lines.append(f"  pid {p['pid']} {p['name'][:22]:<22} threads={p['threads']:<3} "
                     f"OMP_NUM_THREADS={p['omp']} affinity={p['affinity']} cpu={p['cpu_s']:.1f}s "
                     f"{extra or ''} {p['cmd'][:70]}")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["_aha"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--out", required=True)
        ap.add_argument("overrides", nargs="*")
        a = ap.parse_args(sys.argv[2:])
        return aha_child(a.out, a.overrides)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--cache", default=os.path.join(ROOT, "runs", "bench-vs-trl"))
    ap.add_argument("--systems", default="trl,aha1,aha0",
                    help="comma-separated: trl (float32), trl_bf16 (TRL's bf16 mixed precision, its "
                         "default), aha1 (max_staleness 1), aha0, and variants such as "
                         "aha1+learner.share_prompts=false (aha with more overrides)")
    ap.add_argument("--timeline", action="store_true", help="print each aha run's start-up timeline")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    ap.add_argument("--wait-idle", type=float, default=900.0,
                    help="before each run, wait up to this long for other processes to finish")
    ap.add_argument("overrides", nargs="*", help="aha dotted overrides for both aha runs (and SFT)")
    a = ap.parse_args()
    cache = os.path.abspath(a.cache)
    os.makedirs(cache, exist_ok=True)
    systems = a.systems.split(",")
    py = ensure_trl_venv(cache) if any(s in TRL_SYSTEMS for s in systems) else None
    ckpt = ensure_sft(cache, a.sft_steps, a.overrides)
    job = write_trl_job(cache, ckpt, a.steps, a.overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = []
    for k in range(a.rounds):
        for s in systems:
            tag = f"{stamp}-r{k}-{s}"
            busy = wait_idle(a.wait_idle)
            log(f"round {k + 1}/{a.rounds}: {s} (machine {busy:.0f}% busy before)")
            if s in TRL_SYSTEMS:
                r = run_trl(py, job, cache, tag, a.timeout, bf16=s == "trl_bf16")
            else:  # aha<staleness>[+key=value...]: a variant with overrides of its own
                base, *extra = s.split("+")
                tag = f"{stamp}-r{k}-{base}-v{systems.index(s)}" if extra else tag
                r = run_aha(ckpt, int(base.removeprefix("aha")), a.steps, cache, tag,
                            [*a.overrides, *extra], a.timeout)
                r["system"] = "+".join([r["system"], *extra])
            r["tag"], r["round"], r["busy_before"] = tag, k, busy
            results.append(r)
            with open(os.path.join(cache, "results.jsonl"), "a") as f:
                f.write(json.dumps(r) + "\n")
            sm = summarize(r)
            log(f"  {s}: median step {sm['median step (s)']:.3f}s, {sm['samples/s']:.1f} samples/s, "
                f"start to first step {sm['start to first step (s)']:.1f}s")
            if a.timeline and s not in TRL_SYSTEMS:
                print(timeline(r), flush=True)
    print(f"\naha vs TRL GRPOTrainer: {a.steps} GRPO steps, {a.rounds} round(s), SFT checkpoint {ckpt}")
    print("median over rounds (min-max over rounds); step medians drop the first step")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
