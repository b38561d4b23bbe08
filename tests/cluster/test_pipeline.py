"""Stage-level resume bookkeeping (cluster/pipeline.py) without actors."""
import json
import os

import pytest

from cluster.config import load_config
from cluster.pipeline import Pipeline, commit, forget, tmp_path

R1 = "cluster/configs/demo_r1.yaml"


def finish(pipe, i, run_dir, name):
    pipe.begin(i)
    final = os.path.join(run_dir, "checkpoints", name)
    os.makedirs(tmp_path(final))
    commit(tmp_path(final), final, pipe.manifest(i))
    pipe.finish(i, {"checkpoint": final}, {"end": {"accuracy": 0.5}}, 10 * (i + 1), [final], {})
    return final


def test_resume_skips_finished_stages_and_redoes_the_first_unfinished_one(tmp_path):
    cfg = load_config(R1, [f"run.root={tmp_path}"])
    run_dir = str(tmp_path)
    pipe = Pipeline(run_dir, cfg)
    finish(pipe, 0, run_dir, "0-cold-start")
    finish(pipe, 1, run_dir, "1-reasoning-rl")
    pipe.begin(2)  # killed mid-way: running, its output still under the temporary name
    os.makedirs(os.path.join(run_dir, "datasets", ".2-rejection.tmp"))
    plan = Pipeline(run_dir, load_config(R1, [f"run.root={tmp_path}", "run.timeout_s=5"])).plan()
    assert [p is not None for p in plan] == [True, True] + [False] * 5  # operational keys do not count
    assert plan[1]["global_step"] == 20
    # a later stage's config may change; the finished ones still count
    plan = Pipeline(run_dir, load_config(R1, [f"run.root={tmp_path}", "stages.5.steps=7"])).plan()
    assert [p is not None for p in plan][:2] == [True, True]


def test_a_changed_finished_stage_is_refused_naming_the_change(tmp_path):
    run_dir = str(tmp_path)
    pipe = Pipeline(run_dir, load_config(R1, [f"run.root={tmp_path}"]))
    finish(pipe, 0, run_dir, "0-cold-start")
    finish(pipe, 1, run_dir, "1-reasoning-rl")
    with pytest.raises(ValueError, match=r"stage 1-reasoning-rl finished with another config "
                                         r"\(changed: stages.1.steps: 40 -> 41\)"):
        Pipeline(run_dir, load_config(R1, [f"run.root={tmp_path}", "stages.1.steps=41"])).plan()
    with pytest.raises(ValueError, match=r"stage 0-cold-start .*learner.lr"):
        Pipeline(run_dir, load_config(R1, [f"run.root={tmp_path}", "learner.lr=1e-4"])).plan()


def test_a_half_written_or_replaced_output_is_not_taken_for_a_finished_one(tmp_path):
    run_dir = str(tmp_path)
    cfg = load_config(R1, [f"run.root={tmp_path}"])
    pipe = Pipeline(run_dir, cfg)
    finish(pipe, 0, run_dir, "0-cold-start")
    final = finish(pipe, 1, run_dir, "1-reasoning-rl")
    json.dump({"stage_hash": "something else"}, open(os.path.join(final, "manifest.json"), "w"))
    assert [p is not None for p in Pipeline(run_dir, cfg).plan()][:3] == [True, False, False]
    os.remove(os.path.join(final, "manifest.json"))
    assert Pipeline(run_dir, cfg).plan()[1] is None


def test_forget_drops_the_rows_and_files_of_stages_that_run_again(tmp_path):
    run = tmp_path
    rows = [{"stage": "a", "step": 1}, {"stage": "b", "step": 1}, {"stage": "b", "step": 2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "b", "st')
    (run / "eval.jsonl").write_text(json.dumps({"stage": "b"}) + "\n")
    for p in ("trajectories/b", "trajectories/eval-b", "checkpoints/b-step5", "checkpoints/.b.tmp",
              "trajectories/a", "checkpoints/a"):
        os.makedirs(run / p)
    forget(str(run), ["b"])
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == rows[:1]
    assert (run / "eval.jsonl").read_text() == ""
    assert sorted(os.listdir(run / "trajectories")) == ["a"] and os.listdir(run / "checkpoints") == ["a"]


def test_a_failed_stage_is_recorded_and_runs_again(tmp_path):
    run_dir = str(tmp_path)
    cfg = load_config(R1, [f"run.root={tmp_path}"])
    pipe = Pipeline(run_dir, cfg)
    finish(pipe, 0, run_dir, "0-cold-start")
    pipe.begin(1)
    pipe.fail(1, "ValueError: stage 1 kept 0 of 8 samples")
    state = json.load(open(os.path.join(run_dir, "pipeline.json")))
    assert state["stages"]["1-reasoning-rl"]["status"] == "failed"
    assert "kept 0" in state["stages"]["1-reasoning-rl"]["error"]
    assert [p is not None for p in Pipeline(run_dir, cfg).plan()][:2] == [True, False]
