"""``aha report``: the stage table, curves.png and sampled trajectories, read from a run directory."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from cluster.cli import main
from cluster.report import plot_curves, stage_table, where_to_look


def _run_dir(tmp_path):
    d = tmp_path / "run"
    (d / "trajectories" / "1-grpo").mkdir(parents=True)
    rows = [{"stage": "0-sft", "step": i, "sft_loss": 3.0 - 0.1 * i} for i in range(1, 21)]
    rows += [{"stage": "1-grpo", "step": i, "reward_mean": 0.1 * i, "accuracy_mean": 0.05 * i,
              "format_mean": 1.0, "response_len_mean": 30 + i, "kl": 0.001 * i, "entropy": 1.0}
             for i in range(1, 11)]
    with open(d / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"stage": "1-grpo", "step": 11, "rew')  # a job killed mid-write
    evals = [{"stage": "1-grpo", "step": 0, "accuracy": 0.2, "cons_at_k": 0.3, "k": 4},
             {"stage": "1-grpo", "step": 10, "accuracy": 0.6, "cons_at_k": 0.7, "k": 4}]
    with open(d / "eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in evals)
    pq.write_table(pa.table({"prompt_id": ["a", "a", "b"], "response": ["<answer> 4 </answer>", "x", "y"],
                             "reward": [1.1, 0.0, 0.1], "answer": ["4", "4", "7"],
                             "weight_version": [9, 9, 9]}),
                   d / "trajectories" / "1-grpo" / "part-000000.parquet")
    return str(d)


def test_stage_table_reads_first_and_last_tenth(tmp_path):
    table = {r["stage"]: r for r in stage_table(_run_dir(tmp_path))}
    assert table["0-sft"]["steps"] == 20
    assert abs(table["0-sft"]["sft_loss_first"] - 2.85) < 1e-9  # mean of steps 1, 2
    assert abs(table["0-sft"]["sft_loss_last"] - 1.05) < 1e-9  # steps 19, 20
    g = table["1-grpo"]
    assert g["steps"] == 10 and abs(g["reward_mean_first"] - 0.1) < 1e-9 and abs(g["reward_mean_last"] - 1.0) < 1e-9
    assert g["eval_start"]["accuracy"] == 0.2 and g["eval_end"]["cons_at_k"] == 0.7


def test_curves_png_is_written(tmp_path):
    d = _run_dir(tmp_path)
    png = plot_curves(d)
    assert png == os.path.join(d, "curves.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000
    assert plot_curves(str(tmp_path)) is None  # nothing to plot


def test_report_command_and_closing_lines(tmp_path, capsys):
    d = _run_dir(tmp_path)
    assert main(["report", d, "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "1-grpo" in out and "0.200/0.300 → 0.600/0.700" in out
    assert "reward 1.10" in out and "reward 0.00" in out  # best and worst sample
    hint = where_to_look(d)
    assert f"aha report {d}" in hint and "1-grpo" in hint and "curves.png" in hint
    assert main(["report", str(tmp_path / "missing")]) == 2


# ---- plots/ (one PNG per curve) and the per-stage summary tables --------------------------------
import math  # noqa: E402
import random  # noqa: E402

from cluster.report import (eval_steps, global_steps, plot_stages, summary_markdown,  # noqa: E402
                            summary_text)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _three_stage_run(tmp_path, n_sft=60, n_grpo=200, n_rm=40, with_global_step=True):
    """sft (sft_loss) -> grpo (rewards, kl, entropy, staleness, reflection words) -> reward_model
    (rm_loss): no stage logs language_mean, so there is no language.png."""
    rng = random.Random(0)
    d = tmp_path / "run3"
    d.mkdir()
    rows, g = [], 0
    for i in range(1, n_sft + 1):
        g += 1
        rows.append({"stage": "0-sft", "step": i, "global_step": g,
                     "sft_loss": 2.5 * math.exp(-i / 20) + 0.4 + rng.gauss(0, 0.05)})
    for i in range(1, n_grpo + 1):
        g += 1
        t = i / n_grpo
        rows.append({"stage": "1-grpo", "step": i, "global_step": g,
                     "reward_mean": 0.2 + 0.9 * t + rng.gauss(0, 0.08),
                     "accuracy_mean": min(1.0, max(0.0, 0.15 + 0.55 * t + rng.gauss(0, 0.06))),
                     "format_mean": min(1.0, 0.6 + 0.4 * t),
                     "response_len_mean": 120 + 300 * t + rng.gauss(0, 15),
                     "reflection_words_mean": 0.3 + 2.5 * t * t + rng.gauss(0, 0.2),
                     "kl": 0.02 * t + abs(rng.gauss(0, 0.002)), "entropy": 1.2 - 0.4 * t + rng.gauss(0, 0.03),
                     "staleness_mean": rng.choice([0.0, 0.5, 1.0])})
    for i in range(1, n_rm + 1):
        g += 1
        rows.append({"stage": "2-rm", "step": i, "global_step": g,
                     "rm_loss": 0.69 * math.exp(-i / 15) + 0.2 + rng.gauss(0, 0.02),
                     "rm_accuracy": 0.5 + 0.4 * (1 - math.exp(-i / 10))})
    if not with_global_step:
        for r in rows:
            del r["global_step"]
    with open(d / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    evals = [{"stage": "0-sft", "step": n_sft, "accuracy": 0.12, "cons_at_k": 0.2, "k": 8,
              "response_len_mean": 110.0},
             {"stage": "1-grpo", "step": 0, "accuracy": 0.12, "cons_at_k": 0.2, "k": 8},
             {"stage": "1-grpo", "step": n_grpo // 2, "accuracy": 0.41, "cons_at_k": 0.5, "k": 8},
             {"stage": "1-grpo", "step": n_grpo, "accuracy": 0.63, "cons_at_k": 0.72, "k": 8,
              "reflection_words_mean": 2.4, "language_mean": 0.97}]
    with open(d / "eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in evals)
    return str(d)


def test_plot_stages_writes_one_png_per_curve_that_some_stage_has(tmp_path):
    import matplotlib.image as mpimg

    d = _three_stage_run(tmp_path)
    paths = plot_stages(d)
    names = {os.path.basename(p) for p in paths}
    assert names == {"reward.png", "accuracy.png", "format.png", "response_length.png",
                     "reflection_words.png", "kl.png", "entropy.png", "staleness.png",
                     "sft_loss.png", "rm_loss.png"}
    assert "language.png" not in names  # no stage logged language_mean
    assert all(os.path.dirname(p) == os.path.join(d, "plots") for p in paths)
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert os.path.getsize(p) > 5_000
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    # every write went through a temporary file that was renamed away
    assert sorted(os.listdir(os.path.join(d, "plots"))) == sorted(names)


def test_plot_stages_skips_curves_no_stage_has(tmp_path):
    d = tmp_path / "sftonly"
    d.mkdir()
    with open(d / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps({"stage": "0-sft", "step": i, "sft_loss": 1.0 / i}) + "\n"
                     for i in range(1, 30))
    out = tmp_path / "elsewhere"
    paths = plot_stages(str(d), str(out))
    assert [os.path.basename(p) for p in paths] == ["sft_loss.png"]  # no kl.png, no reward.png, ...
    assert os.path.dirname(paths[0]) == str(out) and not os.path.exists(d / "plots")
    # only held-out evals (no accuracy_mean anywhere): accuracy.png still shows the pass@1 markers
    with open(d / "eval.jsonl", "w") as f:
        f.write(json.dumps({"stage": "0-sft", "step": 29, "accuracy": 0.3, "cons_at_k": 0.4, "k": 4}) + "\n")
    assert {os.path.basename(p) for p in plot_stages(str(d))} == {"sft_loss.png", "accuracy.png"}
    # an empty run directory: nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_stages(str(empty)) == []


def test_global_steps_and_eval_positions(tmp_path):
    rows = [{"stage": "a", "step": 1}, {"stage": "a", "step": 2}, {"stage": "b", "step": 1},
            {"stage": "b", "step": 2}]
    assert global_steps(rows) == [1, 2, 3, 4]  # old runs: file order from 1
    new = [{**r, "global_step": g} for r, g in zip(rows, [11, 12, 13, 14])]
    assert global_steps(new) == [11, 12, 13, 14]
    evals = [{"stage": "b", "step": 0}, {"stage": "b", "step": 2}, {"stage": "c", "step": 0},
             {"stage": "a", "step": 2, "global_step": 99}]
    assert eval_steps(evals, new) == [12, 14, 14, 99]
    # the same curves from a run that predates global_step
    d = _three_stage_run(tmp_path, with_global_step=False)
    assert len(plot_stages(d)) == 10


def test_report_mentions_the_plots_folder(tmp_path):
    from cluster.report import report

    d = _run_dir(tmp_path)
    out = report(d, samples=1)
    assert os.path.join(d, "plots") in out and "reward.png" in out and "sft_loss.png" in out
    assert "plots:" in where_to_look(d)


def _summary_rows():
    return [
        {"stage": "0-sft", "type": "sft", "pass_at_1": 0.1234, "cons_at_k": 0.2, "k": 16,
         "response_len_mean": 180.44, "reflection_words_mean": 0.5},
        {"stage": "1-grpo", "type": "grpo", "pass_at_1": 0.4567, "cons_at_k": 0.61, "k": 16,
         "response_len_mean": 402.0, "reflection_words_mean": 2.25, "language_mean": 0.975},
        {"stage": "2-rs", "type": "rejection_sample", "kept": 412, "samples": 1600},
        {"stage": "3-rm", "type": "reward_model", "pair_accuracy": 0.8123},
        {"stage": "4-distill", "type": "distill", "pass_at_1": None, "cons_at_k": float("nan")},
    ]


def test_summary_markdown(tmp_path):
    md = summary_markdown(_summary_rows())
    lines = md.strip().splitlines()
    assert lines[0] == ("| stage | type | held-out pass@1 | cons@k (k=16) | mean response length | "
                        "reflection words / response | language consistency | notes |")
    assert set(lines[1]) <= set("|-:") and lines[1].count("|") == 9
    assert len(lines) == 2 + 5 and all(l.startswith("| ") and l.endswith(" |") for l in lines[:1] + lines[2:])
    cells = {l.split(" | ")[0][2:]: [c.strip() for c in l.strip("| ").split(" | ")] for l in lines[2:]}
    assert cells["0-sft"] == ["0-sft", "sft", "0.123", "0.200", "180.4", "0.50", "–", "–"]
    assert cells["1-grpo"] == ["1-grpo", "grpo", "0.457", "0.610", "402.0", "2.25", "0.975", "–"]
    assert cells["2-rs"][:2] == ["2-rs", "rejection_sample"] and cells["2-rs"][2:7] == ["–"] * 5
    assert cells["2-rs"][7] == "kept 412 of 1600 samples (25.8%)"
    assert cells["3-rm"][7] == "held-out pair accuracy 0.81"
    assert cells["4-distill"][2:] == ["–"] * 6  # None and NaN read as missing
    # mixed k: the column header stays generic and each cell names its k; a | in a name is escaped
    mixed = summary_markdown([{"stage": "a|b", "type": "grpo", "cons_at_k": 0.5, "k": 4},
                              {"stage": "c", "type": "grpo", "cons_at_k": 0.6, "k": 8}])
    assert "| cons@k |" in mixed and "0.500 (k=4)" in mixed and "0.600 (k=8)" in mixed
    assert "a\\|b" in mixed
    assert summary_markdown([]).count("\n") == 2  # header and rule only


def test_summary_text_is_fixed_width():
    txt = summary_text(_summary_rows())
    lines = txt.rstrip("\n").splitlines()
    assert lines[0].split() == ["stage", "type", "pass@1", "cons@16", "resp", "len", "reflect/resp",
                                "language", "notes"]
    assert max(len(l) for l in lines) <= 120
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + 5
    # every column starts at the same offset on every line (the rule marks the columns)
    starts = [i for i, c in enumerate(lines[1]) if c == "-" and (i == 0 or lines[1][i - 1] == " ")]
    assert len(starts) == 8
    for l in lines[2:]:
        assert l.startswith(("0-sft", "1-grpo", "2-rs", "3-rm", "4-distill"))
    grpo = next(l for l in lines if l.startswith("1-grpo"))
    assert "0.457" in grpo and "402.0" in grpo and "0.975" in grpo
    # numbers are right-aligned: they end where the rule's dashes end
    end_pass = starts[2] + len(lines[1][starts[2]:].split(" ")[0])
    assert grpo[:end_pass].endswith("0.457")
    assert "kept 412 of 1600 samples" in txt and "held-out pair accuracy 0.81" in txt and "–" in txt
