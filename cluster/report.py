"""What a run did, from its run directory alone: ``aha report runs/<name>``.

Reads ``metrics.jsonl``, ``eval.jsonl`` and the Parquet ``trajectories/``; writes ``curves.png``
(reward, accuracy, format, response length, KL / entropy and held-out pass@1 / cons@k against the
job's global step, one colour per stage) and prints one table row per stage plus a few sampled
trajectories. Works while the job runs (every file it reads is appended atomically).
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file (none if it does not exist); a line that does not parse (the
    last line of a job killed mid-write) is skipped, never raised."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def by_stage(rows: list[dict]) -> "OrderedDict[str, list[dict]]":
    out: OrderedDict[str, list[dict]] = OrderedDict()
    for r in rows:
        out.setdefault(r.get("stage", "?"), []).append(r)
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


def stage_table(run_dir: str) -> list[dict]:
    """One row per stage: steps, first / last reward and accuracy (mean of the first and last 10%
    of steps, at least one), SFT loss, and held-out pass@1 / cons@k at the stage's start and end."""
    metrics = by_stage(read_jsonl(os.path.join(run_dir, "metrics.jsonl")))
    evals = by_stage(read_jsonl(os.path.join(run_dir, "eval.jsonl")))
    table = []
    for stage in list(OrderedDict.fromkeys(list(metrics) + list(evals))):
        rows = metrics.get(stage, [])
        w = max(1, len(rows) // 10)
        head, tail = rows[:w], rows[-w:]
        row = {"stage": stage, "steps": len(rows)}
        for key in ("reward_mean", "accuracy_mean", "sft_loss", "response_len_mean"):
            a, b = _mean(head, key), _mean(tail, key)
            if a is not None:
                row[f"{key}_first"], row[f"{key}_last"] = a, b
        ev = evals.get(stage, [])
        if ev:
            row["eval_start"] = ev[0]
            row["eval_end"] = ev[-1]
        table.append(row)
    return table


def format_table(table: list[dict]) -> str:
    lines = [f"{'stage':>12} {'steps':>5}  {'reward first→last':>18}  {'accuracy first→last':>20}  "
             f"{'sft loss':>14}  {'held-out pass@1 / cons@k (start → end)':>40}"]

    def pair(row, key, fmt="{:.3f}"):
        if f"{key}_first" not in row:
            return "-"
        return f"{fmt.format(row[key + '_first'])}→{fmt.format(row[key + '_last'])}"

    for r in table:
        ev = "-"
        if "eval_start" in r:
            s, e = r["eval_start"], r["eval_end"]
            ev = (f"{s['accuracy']:.3f}/{s['cons_at_k']:.3f} → {e['accuracy']:.3f}/{e['cons_at_k']:.3f}"
                  f" (k={e.get('k', '?')})")
        lines.append(f"{r['stage']:>12} {r['steps']:>5}  {pair(r, 'reward_mean'):>18}  "
                     f"{pair(r, 'accuracy_mean'):>20}  {pair(r, 'sft_loss'):>14}  {ev:>40}")
    return "\n".join(lines)


PANELS = [("reward_mean", "reward"), ("accuracy_mean", "accuracy"), ("format_mean", "format"),
          ("response_len_mean", "response length (tokens)"), ("kl", "KL to reference"),
          ("entropy", "entropy")]


def plot_curves(run_dir: str, out: str | None = None) -> str | None:
    """Write ``curves.png`` (or ``out``); returns its path, or None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    if not rows and not evals:
        return None
    # the global step: metrics rows in file order; an eval row sits at the last metrics row of its
    # stage whose step <= its own (step 0 = the stage's first row)
    x_of: dict[tuple[str, int], int] = {}
    for x, r in enumerate(rows, 1):
        x_of[(r.get("stage", "?"), r.get("step", 0))] = x
    first_x = {}
    for (stage, step), x in x_of.items():
        first_x[stage] = min(first_x.get(stage, x), x)
    stages = list(OrderedDict.fromkeys([r.get("stage", "?") for r in rows + evals]))
    colours = {s: plt.cm.tab10(i % 10) for i, s in enumerate(stages)}

    panels = [p for p in PANELS if any(p[0] in r for r in rows)]
    if any("sft_loss" in r for r in rows):
        panels.insert(0, ("sft_loss", "SFT loss"))
    n = len(panels) + (1 if evals else 0)
    cols = 3 if n > 4 else max(n, 1)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, (key, title) in zip(flat, panels):
        for stage, srows in by_stage(rows).items():
            pts = [(x_of[(stage, r.get("step", 0))], r[key]) for r in srows
                   if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                w = max(1, len(ys) // 15)  # a moving mean over the raw, noisy per-step values
                if w > 1:
                    ax.plot(xs, ys, color=colours[stage], lw=0.8, alpha=0.3)
                    h = w // 2  # centred, so the mean does not lag the raw values
                    smooth = [sum(ys[max(0, i - h):i + h + 1]) / len(ys[max(0, i - h):i + h + 1])
                              for i in range(len(ys))]
                    ax.plot(xs, smooth, color=colours[stage], label=f"{stage} (mean of {w})", lw=1.5)
                else:
                    ax.plot(xs, ys, color=colours[stage], label=stage, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("global step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    if evals:
        ax = flat[len(panels)]
        for stage, erows in by_stage(evals).items():
            xs = [x_of.get((stage, e["step"]), first_x.get(stage, 1) + e["step"] - 1) for e in erows]
            c = colours[stage]
            ax.plot(xs, [e["accuracy"] for e in erows], "o-", color=c, label=f"{stage} pass@1")
            ax.plot(xs, [e["cons_at_k"] for e in erows], "s--", color=c, label=f"{stage} cons@k")
        ax.set_title("held-out pass@1 / cons@k", fontsize=10)
        ax.set_xlabel("global step", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7)
    for ax in flat[n:]:
        ax.axis("off")
    for ax in flat[:len(panels)]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)), fontsize=11)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def sample_trajectories(run_dir: str, stage: str | None = None, n: int = 3) -> list[dict]:
    """``n`` samples from the last part file of ``trajectories/<stage>`` (default: the last GRPO
    stage written), highest and lowest reward first."""
    import pyarrow.parquet as pq

    root = os.path.join(run_dir, "trajectories")
    if not os.path.isdir(root):
        return []
    names = sorted((d for d in os.listdir(root) if not d.startswith("eval-")),
                   key=lambda d: os.path.getmtime(os.path.join(root, d)))
    stage = stage or (names[-1] if names else None)
    folder = os.path.join(root, stage) if stage else None
    parts = sorted(p for p in os.listdir(folder) if p.endswith(".parquet")) if folder and os.path.isdir(folder) else []
    if not parts:
        return []
    rows = pq.read_table(os.path.join(folder, parts[-1]),
                         columns=["prompt_id", "response", "reward", "answer", "weight_version"]).to_pylist()
    rows.sort(key=lambda r: -r["reward"])
    picked = rows[:max(1, n - 1)] + ([rows[-1]] if len(rows) > 1 and n > 1 else [])
    return [{**r, "stage": stage} for r in picked]


def where_to_look(run_dir: str, aha: str = "aha") -> str:
    """The closing lines of a job: where its curves and trajectories are, and how to look."""
    traj = os.path.join(run_dir, "trajectories")
    sets = sorted(os.listdir(traj)) if os.path.isdir(traj) else []
    curves = os.path.join(run_dir, "curves.png")
    lines = [f"  curves:        {curves if os.path.exists(curves) else '(none yet)'}"
             f"  (from {os.path.join(run_dir, 'metrics.jsonl')} and eval.jsonl)",
             f"  trajectories:  {traj}/  Parquet: {', '.join(sets) if sets else '(none)'}",
             f"  look:          {aha} report {run_dir}"]
    if os.path.isdir(os.path.join(run_dir, "tensorboard")):
        lines.append(f"  live:          tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    return "\n".join(lines)


def report(run_dir: str, samples: int = 3) -> str:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"no run directory {run_dir!r}")
    out = [f"run {run_dir}", format_table(stage_table(run_dir))]
    png = plot_curves(run_dir)
    out.append(f"\ncurves: {png}" if png else "\ncurves: nothing to plot yet (no metrics.jsonl rows)")
    picked = sample_trajectories(run_dir, n=samples)
    if picked:
        out.append(f"\nsamples from the last step of {picked[0]['stage']} (best first, worst last):")
        for r in picked:
            text = r["response"].replace("\n", "\\n")
            out.append(f"  [{r['prompt_id']}] reward {r['reward']:.2f}  answer {r['answer']!r}  "
                       f"v{r['weight_version']}: {text[:160]}")
    return "\n".join(out)
