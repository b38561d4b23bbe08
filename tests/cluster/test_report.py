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
