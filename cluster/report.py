"""What a run did, from its run directory alone: ``aha report runs/<name>``.

Reads ``metrics.jsonl``, ``eval.jsonl`` and the Parquet ``trajectories/``; writes ``curves.png``
(reward, accuracy, format, response length, KL / entropy and held-out pass@1 / cons@k against the
job's global step, one colour per stage), one PNG per curve under ``plots/`` (:func:`plot_stages`),
and prints one table row per stage plus a few sampled trajectories. Works while the job runs (every
file it reads is appended atomically, and every image is written to a temporary file first and
renamed into place). :func:`summary_markdown` / :func:`summary_text` render the per-stage summary
(held-out numbers of the model each stage produced) as a Markdown or a plain-text table.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
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


def _num(v) -> float | None:
    """``v`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def global_steps(rows: list[dict]) -> list[int]:
    """The job-wide step of each metrics row: its ``global_step`` where it has one, else (runs
    written before rows carried it) one more than the row before, so that an old run numbers its
    rows in file order from 1."""
    xs, last = [], 0
    for r in rows:
        g = r.get("global_step")
        last = int(g) if isinstance(g, int) and not isinstance(g, bool) else last + 1
        xs.append(last)
    return xs


def eval_steps(evals: list[dict], rows: list[dict], xs: list[int] | None = None) -> list[float]:
    """The global step of each eval row: its own ``global_step`` if it has one; else that of the
    metrics row of its stage and step (step 0, the eval before a stage's first step, sits one
    before that first step); else, for a stage with no metrics rows, its step counted on from the
    eval row before it."""
    xs = global_steps(rows) if xs is None else xs
    at: dict[tuple[str, int], int] = {}
    first: dict[str, int] = {}
    for x, r in zip(xs, rows):
        stage = r.get("stage", "?")
        at[(stage, r.get("step", 0))] = x
        first[stage] = min(first.get(stage, x), x)
    out, last = [], 0
    for e in evals:
        stage, step = e.get("stage", "?"), e.get("step", 0) or 0
        g = e.get("global_step")
        if isinstance(g, (int, float)) and not isinstance(g, bool):
            x = float(g)
        elif (stage, step) in at:
            x = at[(stage, step)]
        elif stage in first:
            x = first[stage] + step - 1
        else:
            x = last + step
        last = max(last, x)
        out.append(x)
    return out


def _smooth(ys: list[float], frac: float = 0.05) -> tuple[list[float], int]:
    """A centred moving mean (so it does not lag the raw values) over about ``frac`` of the points
    (the window is odd: 2 * (frac * n // 2) + 1), and the window; 1 (no smoothing) for fewer than
    30 points at the default 5%."""
    h = int(round(len(ys) * frac)) // 2
    if h < 1:
        return list(ys), 1
    return _moving_mean(ys, h), 2 * h + 1


def _moving_mean(ys: list[float], h: int) -> list[float]:
    """Mean of each point and up to ``h`` neighbours on either side (centred: it does not lag)."""
    return [sum(ys[max(0, i - h):i + h + 1]) / len(ys[max(0, i - h):i + h + 1]) for i in range(len(ys))]


def _stage_colours(plt, rows: list[dict], evals: list[dict]) -> dict:
    stages = list(OrderedDict.fromkeys([r.get("stage", "?") for r in rows + evals]))
    return {s: plt.cm.tab10(i % 10) for i, s in enumerate(stages)}


def _save_atomic(fig, path: str, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` through a temporary file in the same folder and a rename, so a
    reader (a browser, TensorBoard, another ``aha report``) never sees half a PNG."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    # the global step: each row's global_step (file order in older runs); an eval row sits at the
    # metrics row of its stage and step (step 0: just before the stage's first row)
    xs_all = global_steps(rows)
    ex_all = eval_steps(evals, rows, xs_all)
    colours = _stage_colours(plt, rows, evals)

    panels = [p for p in PANELS if any(p[0] in r for r in rows)]
    if any("sft_loss" in r for r in rows):
        panels.insert(0, ("sft_loss", "SFT loss"))
    n = len(panels) + (1 if evals else 0)
    cols = 3 if n > 4 else max(n, 1)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), squeeze=False)
    flat = [a for row in axes for a in row]
    for ax, (key, title) in zip(flat, panels):
        for stage in OrderedDict.fromkeys(r.get("stage", "?") for r in rows):
            pts = [(x, r[key]) for x, r in zip(xs_all, rows)
                   if r.get("stage", "?") == stage and isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                w = max(1, len(ys) // 15)  # a moving mean over the raw, noisy per-step values
                if w > 1:
                    ax.plot(xs, ys, color=colours[stage], lw=0.8, alpha=0.3)
                    ax.plot(xs, _moving_mean(ys, w // 2), color=colours[stage], label=f"{stage} (mean of {w})", lw=1.5)
                else:
                    ax.plot(xs, ys, color=colours[stage], label=stage, lw=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("global step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    if evals:
        ax = flat[len(panels)]
        for stage in OrderedDict.fromkeys(e.get("stage", "?") for e in evals):
            pairs = [(x, e) for x, e in zip(ex_all, evals) if e.get("stage", "?") == stage]
            xs, erows = [p[0] for p in pairs], [p[1] for p in pairs]
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
    try:
        _save_atomic(fig, out)
    finally:
        plt.close(fig)
    return out


# one image per curve under plots/: (file, metrics key, title, y label)
STAGE_PLOTS = [
    ("reward.png", "reward_mean", "reward", "mean reward per step"),
    ("accuracy.png", "accuracy_mean", "accuracy", "fraction correct"),
    ("format.png", "format_mean", "format reward", "mean format reward"),
    ("response_length.png", "response_len_mean", "response length", "mean response length (tokens)"),
    ("reflection_words.png", "reflection_words_mean", "reflection words",
     "reflection words per response"),
    ("language.png", "language_mean", "language consistency", "language consistency"),
    ("kl.png", "kl", "KL to the reference policy", "KL"),
    ("entropy.png", "entropy", "policy entropy", "entropy (nats / token)"),
    ("staleness.png", "staleness_mean", "sample staleness", "mean staleness (weight versions)"),
    ("sft_loss.png", "sft_loss", "SFT loss", "cross-entropy loss"),
    ("rm_loss.png", "rm_loss", "reward-model loss", "pairwise loss"),
]


def plot_stages(run_dir: str, out_dir: str | None = None) -> list[str]:
    """One PNG per curve under ``out_dir`` (default ``<run_dir>/plots/``), returning the paths
    written: the job's global step on x, one colour per stage (only the stages that logged the key);
    faint per-step values under a centred moving mean over ~5% of each stage's points.
    ``accuracy.png`` also marks held-out pass@1 from ``eval.jsonl``. A curve no stage logged is not
    written. Each image is written to a temporary file and renamed into place."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = [e for e in read_jsonl(os.path.join(run_dir, "eval.jsonl")) if _num(e.get("accuracy")) is not None]
    out_dir = out_dir or os.path.join(run_dir, "plots")
    xs_all = global_steps(rows)
    ex_all = eval_steps(evals, rows, xs_all)
    colours = _stage_colours(plt, rows, evals)
    stages = list(OrderedDict.fromkeys(r.get("stage", "?") for r in rows))
    starts = OrderedDict()  # stage -> its first global step, for the faint stage boundaries
    for x, r in zip(xs_all, rows):
        starts.setdefault(r.get("stage", "?"), x)
    name = os.path.basename(os.path.abspath(run_dir))
    written = []
    for fname, key, title, ylabel in STAGE_PLOTS:
        with_eval = key == "accuracy_mean" and bool(evals)
        series = []
        for stage in stages:
            pts = [(x, _num(r.get(key))) for x, r in zip(xs_all, rows) if r.get("stage", "?") == stage]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                series.append((stage, pts))
        if not series and not with_eval:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.2))
        smoothed = False
        for stage, pts in series:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            c = colours[stage]
            sm, w = _smooth(ys)
            if w > 1:
                smoothed = True
                ax.plot(xs, ys, color=c, lw=0.8, alpha=0.25)
                ax.plot(xs, sm, color=c, lw=1.8, label=stage)
            else:
                ax.plot(xs, ys, color=c, lw=1.5, marker="." if len(xs) < 30 else None, label=stage)
        if with_eval:
            drawn = {s for s, _ in series}
            for stage in OrderedDict.fromkeys(e.get("stage", "?") for e in evals):
                pts = [(x, e["accuracy"]) for x, e in zip(ex_all, evals) if e.get("stage", "?") == stage]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="none", marker="D", ms=7,
                        color=colours[stage], markeredgecolor="black", markeredgewidth=0.8, zorder=5,
                        label=None if stage in drawn else f"{stage} (held-out pass@1)")
            ax.plot([], [], ls="none", marker="D", ms=7, color="white", markeredgecolor="black",
                    label="held-out pass@1")
            ax.set_ylim(-0.02, 1.02)
        lo, hi = ax.get_xlim()  # stage boundaries inside this plot's range only (not widening it)
        for stage, x0 in list(starts.items())[1:]:
            if lo < x0 - 0.5 < hi:
                ax.axvline(x0 - 0.5, color="grey", lw=0.6, ls=":", alpha=0.6)
        ax.set_xlim(lo, hi)
        ax.set_title(f"{title} — {name}", fontsize=11, pad=16 if smoothed else 6)
        if smoothed:
            ax.text(0.5, 1.015, "faint: per step; line: moving mean over ~5% of a stage's steps",
                    transform=ax.transAxes, ha="center", va="bottom", fontsize=7, color="dimgrey")
        ax.set_xlabel("global step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best", framealpha=0.85)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        try:
            _save_atomic(fig, path)
        finally:
            plt.close(fig)
        written.append(path)
    return written


# ---- per-stage summary tables -----------------------------------------------------------------
DASH = "–"
SUMMARY_COLUMNS = ["stage", "type", "held-out pass@1", "cons@k", "mean response length",
                   "reflection words / response", "language consistency", "notes"]


def _fmt(v, spec: str) -> str:
    v = _num(v)
    return DASH if v is None else format(v, spec)


# the same columns under shorter names, so the terminal table fits ~120 columns
SUMMARY_COLUMNS_SHORT = ["stage", "type", "pass@1", "cons@k", "resp len", "reflect/resp", "language",
                         "notes"]


def _summary_cells(rows: list[dict], short: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and cell strings shared by the Markdown and plain-text tables."""
    ks = {int(r["k"]) for r in rows if _num(r.get("cons_at_k")) is not None and _num(r.get("k")) is not None}
    header = list(SUMMARY_COLUMNS_SHORT if short else SUMMARY_COLUMNS)
    if len(ks) == 1:
        k = ks.pop()
        header[3] = f"cons@{k}" if short else f"cons@k (k={k})"
        per_row_k = False
    else:
        per_row_k = len(ks) > 1
    body = []
    for r in rows:
        cons = _fmt(r.get("cons_at_k"), ".3f")
        if per_row_k and cons != DASH and _num(r.get("k")) is not None:
            cons += f" (k={int(r['k'])})"
        notes = []
        kept, n = _num(r.get("kept")), _num(r.get("samples"))
        if kept is not None and n:
            notes.append(f"kept {int(kept)} of {int(n)} samples ({100 * kept / n:.1f}%)")
        elif kept is not None:
            notes.append(f"kept {int(kept)} samples")
        elif n is not None:
            notes.append(f"{int(n)} samples")
        if _num(r.get("pair_accuracy")) is not None:
            notes.append(f"held-out pair accuracy {r['pair_accuracy']:.2f}")
        if r.get("notes"):
            notes.append(str(r["notes"]))
        body.append([str(r.get("stage", "?")), str(r.get("type") or DASH),
                     _fmt(r.get("pass_at_1"), ".3f"), cons,
                     _fmt(r.get("response_len_mean"), ".1f"),
                     _fmt(r.get("reflection_words_mean"), ".2f"),
                     _fmt(r.get("language_mean"), ".3f"),
                     "; ".join(notes) or DASH])
    return header, body


def summary_markdown(rows: list[dict]) -> str:
    """A Markdown table, one line per stage: stage | type | held-out pass@1 | cons@k | mean
    response length | reflection words / response | language consistency | notes. Each row dict
    has ``stage``, ``type`` and optionally ``pass_at_1``, ``cons_at_k``, ``k``,
    ``response_len_mean``, ``reflection_words_mean``, ``language_mean`` (held-out numbers of the
    model the stage produced), ``kept`` / ``samples`` (rejection sampling), ``pair_accuracy``
    (reward model) and free-form ``notes``. A missing value reads "–"; when all rows share one k
    the cons@k header names it."""
    header, body = _summary_cells(rows)

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---", "---"] + ["---:"] * 5 + ["---"]
    return "\n".join([line(header), "|" + "|".join(align) + "|"] + [line(c) for c in body]) + "\n"


def summary_text(rows: list[dict]) -> str:
    """:func:`summary_markdown`'s table in fixed-width plain text, for the terminal: the same
    cells under shorter column names (pass@1, cons@k, resp len, reflect/resp, language: all of
    them held-out numbers), stage, type and notes left-aligned, the numbers right-aligned."""
    header, body = _summary_cells(rows, short=True)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    left = {0, 1, len(header) - 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(c) for c in body]) + "\n"


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
    plots = os.path.join(run_dir, "plots")
    lines = [f"  curves:        {curves if os.path.exists(curves) else '(none yet)'}"
             f"  (from {os.path.join(run_dir, 'metrics.jsonl')} and eval.jsonl)",
             f"  trajectories:  {traj}/  Parquet: {', '.join(sets) if sets else '(none)'}",
             *([f"  plots:         {plots}/  (one PNG per curve)"] if os.path.isdir(plots) else []),
             f"  look:          {aha} report {run_dir}"]
    if os.path.isdir(os.path.join(run_dir, "tensorboard")):
        lines.append(f"  live:          tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    return "\n".join(lines)


def report(run_dir: str, samples: int = 3) -> str:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"no run directory {run_dir!r}")
    out = [f"run {run_dir}", format_table(stage_table(run_dir))]
    summary = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary):  # the job's end-of-run table (held-out numbers of every stage's model)
        with open(summary) as f:
            rows = json.load(f).get("stages")
        if rows:
            out.append("\n" + summary_text(rows))
    png = plot_curves(run_dir)
    out.append(f"\ncurves: {png}" if png else "\ncurves: nothing to plot yet (no metrics.jsonl rows)")
    if png:
        pngs = plot_stages(run_dir)
        if pngs:
            out.append(f"plots:  {os.path.dirname(pngs[0])}/  "
                       f"({', '.join(os.path.basename(p) for p in pngs)})")
    picked = sample_trajectories(run_dir, n=samples)
    if picked:
        out.append(f"\nsamples from the last step of {picked[0]['stage']} (best first, worst last):")
        for r in picked:
            text = r["response"].replace("\n", "\\n")
            out.append(f"  [{r['prompt_id']}] reward {r['reward']:.2f}  answer {r['answer']!r}  "
                       f"v{r['weight_version']}: {text[:160]}")
    return "\n".join(out)
