"""``load_prompts`` on the data formats people have: files, shard folders, save_to_disk folders,
column mappings, GSM8K answers, and the errors for what it cannot read."""
import csv
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollout.datasets import FORMATS, describe_formats, load_prompts

ROWS = [{"id": "a", "question": "1+1?", "answer": "2"}, {"id": "b", "question": "2+3?", "answer": "5"}]
GSM8K = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
         "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def _answers(path, **kw):
    recs, skipped = load_prompts(str(path), **kw)
    return [(r.id, r.question, r.answer) for r in recs], skipped


def _save_to_disk(folder, rows, shards=1):
    """A folder laid out as ``datasets.Dataset.save_to_disk`` writes it: Arrow IPC stream shards."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    per = -(-len(rows) // shards)
    for i, name in enumerate(names):
        part = table.slice(i * per, per)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as w:
            w.write_table(part)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_fingerprint": "x", "_split": None}))
    return folder


EXPECTED = [("a", "1+1?", "2"), ("b", "2+3?", "5")]


def test_parquet_jsonl_and_json_lines(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    lines = "\n".join(json.dumps(r) for r in ROWS) + "\n"
    (tmp_path / "d.jsonl").write_text(lines)
    (tmp_path / "d.json").write_text(lines)
    for name in ("d.parquet", "d.jsonl", "d.json"):
        assert _answers(tmp_path / name) == (EXPECTED, {}), name


def test_json_array_object_with_a_list_and_single_record(tmp_path):
    (tmp_path / "arr.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "obj.json").write_text(json.dumps({"version": 1, "data": ROWS}, indent=2))
    assert _answers(tmp_path / "arr.json") == (EXPECTED, {})
    assert _answers(tmp_path / "obj.json") == (EXPECTED, {})
    # a lone code record is a record, not a wrapper of its ``tests`` list
    code = {"id": "c", "question": "echo", "answer": "", "task": "code",
            "tests": [{"stdin": "1", "expected": "1"}]}
    (tmp_path / "one.json").write_text(json.dumps(code, indent=2))
    (rec,), _ = load_prompts(str(tmp_path / "one.json"))
    assert rec.task == "code" and rec.tests == code["tests"]
    (tmp_path / "two.json").write_text(json.dumps({"train": ROWS, "test": ROWS}))
    with pytest.raises(ValueError, match=r"several lists \(train, test\)"):
        load_prompts(str(tmp_path / "two.json"))
    (tmp_path / "bad.json").write_text('[{"question": "q", "answer": "1"},')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(str(tmp_path / "bad.json"))


def test_json_lines_keep_a_raw_line_separator_inside_a_string(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": "a\u2028b", "answer": "1"}, ensure_ascii=False) + "\n")
    (rec,), skipped = load_prompts(str(p))
    assert rec.question == "a\u2028b" and skipped == {}


def test_csv_keeps_text_and_parses_json_tests(tmp_path):
    p = tmp_path / "d.csv"
    tests = [{"stdin": "3\n", "expected": "6\n"}]
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "answer", "task", "tests"])
        w.writerow(["a", "What is 1,000 + 1?\nShow work.", "007", "", ""])
        w.writerow(["c", "double it", "", "code", json.dumps(tests)])
        w.writerow(["d", "bad tests", "", "code", "{not json"])
        w.writerow(["e", "too", "many", "cells", "", "extra"])
    recs, skipped = load_prompts(str(p))
    assert [(r.id, r.task) for r in recs] == [("a", "math"), ("c", "code")]
    assert recs[0].question == "What is 1,000 + 1?\nShow work." and recs[0].answer == "007"
    assert recs[0].tests is None and recs[1].tests == tests
    assert skipped == {"skipped_malformed": 2}


def test_folder_of_parquet_shards_nested_and_hidden_files_ignored(tmp_path):
    d = tmp_path / "shards"
    (d / "train").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS[:1]), d / "part-0000.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[1:]), d / "train" / "part-0001.parquet")
    # hidden, temporary and Spark bookkeeping files must not be read (they would add row "z")
    pq.write_table(pa.Table.from_pylist([{"id": "z", "question": "z", "answer": "0"}]),
                   d / ".part-0002.parquet")
    (d / ".part-0003.parquet.tmp").write_bytes(b"partial")
    (d / "_SUCCESS").write_text("")
    (d / "README.md").write_text("# shards")
    assert _answers(d) == (EXPECTED, {})


def test_shards_of_several_splits_are_refused(tmp_path):
    d = tmp_path / "gsm8k" / "main"
    d.mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_pylist(ROWS), d / f"{split}-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"several splits \(test, train\).*main/train-\*\.parquet"):
        load_prompts(str(tmp_path / "gsm8k"))
    # ... and the glob the error suggests reads the one split
    assert _answers(d / "train-*.parquet")[0] == EXPECTED
    with pytest.raises(ValueError, match="no such file or folder"):
        load_prompts(str(d / "validation-*.parquet"))


def test_save_to_disk_folder_is_read_with_pyarrow(tmp_path):
    d = _save_to_disk(tmp_path / "ds", ROWS + [{"id": "c", "question": "", "answer": "1"}], shards=2)
    assert _answers(d) == (EXPECTED, {"skipped_malformed": 1})
    assert _answers(d / "data-00000-of-00002.arrow")[0] == EXPECTED  # one .arrow shard alone


def test_dataset_dict_folder_asks_for_a_split(tmp_path):
    d = tmp_path / "dd"
    _save_to_disk(d / "train", ROWS)
    _save_to_disk(d / "test", ROWS)
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(ValueError, match=r"DatasetDict \(splits: train, test\).*dd/train'"):
        load_prompts(str(d))
    assert _answers(d / "train")[0] == EXPECTED


def test_column_mapping_and_its_errors(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("uid,problem,solution,question\n7,What is 2+2?,4,decoy\n")
    (rec,), _ = load_prompts(str(p), columns={"id": "uid", "question": "problem", "answer": "solution"})
    # the mapped answer column is not also taken as the (unmapped) gold solution
    assert (rec.id, rec.question, rec.answer, rec.solution) == ("7", "What is 2+2?", "4", None)
    with pytest.raises(ValueError, match=r"data file '.*x\.csv': column 'prob' \(data\.columns\.question\) "
                                         r"not found; columns: uid, problem, solution, question"):
        load_prompts(str(p), columns={"question": "prob"})
    with pytest.raises(ValueError, match=r"unknown field\(s\) prompt; allowed: id, question, answer"):
        load_prompts(str(p), columns={"prompt": "problem"})
    with pytest.raises(ValueError, match=r"data\.columns\.answer: expected a column name"):
        load_prompts(str(p), columns={"answer": None})


def test_mapping_on_parquet_and_json_rows(tmp_path):
    rows = [{"instruction": "q1", "output": 3}, {"instruction": "q2", "output": 0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    cols = {"question": "instruction", "answer": "output"}
    for name in ("d.parquet", "d.json"):
        recs, _ = load_prompts(str(tmp_path / name), columns=cols)
        assert [(r.question, r.answer) for r in recs] == [("q1", "3"), ("q2", "0")], name
        with pytest.raises(ValueError, match="column 'out'.*columns: instruction, output"):
            load_prompts(str(tmp_path / name), columns={"answer": "out"})
    # without the mapping nothing is usable, and the error names the columns there are
    with pytest.raises(ValueError, match="no usable rows.*columns: instruction, output"):
        load_prompts(str(tmp_path / "d.parquet"))


def test_gsm8k_answers_give_the_number_and_a_gold_solution(tmp_path):
    rows = [{"question": "Natalia sold clips...", "answer": GSM8K},
            {"question": "big", "answer": "It is 1,000 + 234.\n#### 1,234"},
            {"question": "own solution", "answer": "x\n#### 5",
             "solution": " mine </think> <answer> 5 </answer>"},
            {"question": "nothing after", "answer": "some reasoning ####  "}]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recs, skipped = load_prompts(str(tmp_path / "g.jsonl"))
    assert [r.answer for r in recs] == ["72", "1234", "5"] and skipped == {"skipped_malformed": 1}
    assert recs[0].solution == (" Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips "
                                "altogether in April and May. </think> <answer> 72 </answer>")
    assert recs[1].solution == " It is 1,000 + 234. </think> <answer> 1234 </answer>"
    assert recs[2].solution == " mine </think> <answer> 5 </answer>"


def test_unreadable_inputs_raise_clear_errors(tmp_path):
    for name in ("d.txt", "d.xlsx"):
        (tmp_path / name).write_text("question,answer\n")
        with pytest.raises(ValueError, match=r"cannot read \.\w+; accepted:\n  - \.parquet file"):
            load_prompts(str(tmp_path / name))
    with pytest.raises(ValueError, match="no such file or folder"):
        load_prompts(str(tmp_path / "missing.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no Parquet shards"):
        load_prompts(str(tmp_path / "empty"))
    (tmp_path / "corrupt.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"corrupt\.parquet': cannot read"):
        load_prompts(str(tmp_path / "corrupt.parquet"))
    (tmp_path / "none.csv").write_text("question,answer\n")
    with pytest.raises(ValueError, match="no usable rows"):
        load_prompts(str(tmp_path / "none.csv"))
    assert len(FORMATS) == len(describe_formats().splitlines()) and "save_to_disk" in describe_formats()


def test_malformed_rows_are_logged_but_not_flooded(tmp_path, caplog):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(["{bad"] * 25 + [json.dumps(ROWS[0])]))
    with caplog.at_level(logging.WARNING, logger="rollout.datasets"):
        recs, skipped = load_prompts(str(p))
    assert len(recs) == 1 and skipped == {"skipped_malformed": 25}
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("skipped: not JSON" in m for m in msgs) == 10
    assert any("15 more malformed rows skipped (25 in all)" in m for m in msgs)
