"""Prompt datasets: records with a checkable answer, loaded from files and folders or generated.

A record is ``{"id", "question", "answer", "task", "tests"?, "solution"?}``. ``load_prompts`` reads
the formats of ``FORMATS`` (Parquet and save_to_disk Arrow through pyarrow, JSON, CSV); a column
mapping names the source columns, GSM8K ``#### answer`` texts are split into the answer and a gold
solution, and malformed rows are skipped, counted and logged, never silently lost.
``arithmetic`` is the built-in seeded synthetic task of the demo, with disjoint train and held-out
splits and gold reasoning traces for cold-start SFT.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

FIELDS = ("id", "question", "answer", "task", "tests", "solution")
"""The record fields a ``columns`` mapping may name."""
_DEFAULTS = {"question": ("question", "prompt", "problem"), "answer": ("answer", "solution_answer")}
FORMATS = (
    ".parquet file",
    ".jsonl file",
    ".json file (JSON lines, an array of objects, or an object holding one such array)",
    ".csv file (with a header row; a 'tests' cell is JSON text)",
    ".arrow file (Arrow IPC stream, as datasets writes)",
    "folder of Parquet shards (nested one level deep), or a glob of them like data/train-*.parquet",
    "datasets save_to_disk folder of one split (dataset_info.json, state.json, data-*.arrow)",
)
_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")
_MAX_LOGGED = 10


def describe_formats() -> str:
    """The accepted data formats, one per line, for error messages."""
    return "\n".join(f"  - {f}" for f in FORMATS)


@dataclass
class PromptRecord:
    id: str
    question: str
    answer: str
    task: str = "math"
    tests: list[dict[str, Any]] | None = None
    solution: str | None = None
    """A gold completion (reasoning + answer), used by SFT stages."""
    meta: dict[str, Any] = field(default_factory=dict)


def _gsm8k(text: str) -> tuple[str, str]:
    """``(answer, reasoning)`` of a GSM8K answer ``"<reasoning> #### <answer>"``: the answer after the
    last ``####`` without thousands commas, the reasoning without ``<<48/2=24>>`` calculator
    annotations and with its whitespace collapsed."""
    reasoning, _, final = text.rpartition("####")
    answer = re.sub(r"(?<=\d),(?=\d)", "", final.strip())
    return answer, " ".join(re.sub(r"<<[^<>]*>>", "", reasoning).split())


def _record_from_row(i: int, row: dict, source: str, columns: dict[str, str] | None = None) -> PromptRecord:
    """A record from one row; ``columns`` (field -> source column) overrides the default columns of
    a field, and a column claimed by the mapping is not a default of another field."""
    columns = columns or {}
    claimed = set(columns.values())

    def get(name: str):
        if name in columns:
            return row.get(columns[name])
        for c in _DEFAULTS.get(name, (name,)):
            if c not in claimed and row.get(c) is not None:
                return row[c]
        return None

    q, a, tests, solution, rid = get("question"), get("answer"), get("tests"), get("solution"), get("id")
    task = get("task") or "math"
    if not isinstance(q, str) or not q.strip():
        raise ValueError("missing 'question' (or 'prompt'/'problem') text"
                         if "question" not in columns else f"missing {columns['question']!r} text")
    if isinstance(tests, str):  # CSV cells (and some exports) hold the tests as JSON text
        if tests.strip():
            try:
                tests = json.loads(tests)
            except json.JSONDecodeError as e:
                raise ValueError(f"'tests' is not JSON: {e}") from None
        else:
            tests = None
    if not isinstance(solution, str) or not solution.strip():
        solution = None
    answer = "" if a is None else str(a)
    if task == "math" and "####" in answer:
        answer, reasoning = _gsm8k(answer)
        if solution is None and reasoning:
            solution = f" {reasoning} </think> <answer> {answer} </answer>"
    if task == "math" and answer.strip() == "":
        raise ValueError("math row without 'answer'")
    if task == "code" and not tests:
        raise ValueError("code row without 'tests'")
    return PromptRecord(id=f"{source}:{i}" if rid is None or str(rid) == "" else str(rid),
                        question=q, answer=answer, task=str(task), tests=tests, solution=solution)


def _where(path: str) -> str:
    kind = "folder " if os.path.isdir(path) else "file " if os.path.exists(path) else ""
    return f"data {kind}{path!r}"


def _concat(tables: list):
    import pyarrow as pa
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")


def _read_parquet(files: list[str]):
    import pyarrow.parquet as pq
    return _concat([pq.read_table(f) for f in files])


def _read_arrow_stream(files: list[str]):
    import pyarrow as pa
    tables = []
    for f in files:
        with pa.OSFile(f) as src:
            tables.append(pa.ipc.open_stream(src).read_all())
    return _concat(tables)


def _one_split(where: str, files: list[str], base: str | None = None) -> None:
    """Refuse shards of more than one split (``train``/``test``... by file-name prefix, or by
    subfolder of ``base``): mixing them would train on the held-out set."""
    splits: dict[str, str] = {}
    for f in files:
        sub = os.path.relpath(os.path.dirname(f), base) if base else "."
        name = os.path.basename(f)
        m = re.match(rf"({'|'.join(_SPLITS)})([-_.])", name)
        if sub in _SPLITS:
            splits.setdefault(sub, os.path.join(base, sub))
        elif m:
            splits.setdefault(m[1], f if name == f"{m[1]}.parquet"
                              else os.path.join(os.path.dirname(f), f"{m[1]}{m[2]}*.parquet"))
    if len(splits) > 1:
        raise ValueError(f"{where} holds Parquet shards of several splits ({', '.join(sorted(splits))});"
                         f" point data at one, e.g. {splits.get('train', next(iter(splits.values())))!r}")


def _read_folder(path: str):
    where = _where(path)
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        with open(os.path.join(path, "dataset_dict.json")) as f:
            splits = json.load(f).get("splits") or sorted(
                d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        eg = "train" if "train" in splits else (splits[0] if splits else "train")
        raise ValueError(f"{where} is a DatasetDict (splits: {', '.join(splits) or 'none'}); point data "
                         f"at one split's folder, e.g. {os.path.join(path, eg)!r}")
    if os.path.isfile(os.path.join(path, "state.json")):  # datasets.Dataset.save_to_disk
        with open(os.path.join(path, "state.json")) as f:
            names = [d["filename"] for d in json.load(f).get("_data_files", [])]
        files = ([os.path.join(path, n) for n in names]
                 or sorted(glob.glob(os.path.join(path, "data-*.arrow"))))
        if not files:
            raise ValueError(f"{where}: state.json names no data files and there is no data-*.arrow")
        return _read_arrow_stream(files)
    # glob skips hidden names (.part-0.parquet); also skip _temporary/, _SUCCESS and the like
    files = [f for pat in ("*.parquet", os.path.join("*", "*.parquet"))
             for f in sorted(glob.glob(os.path.join(path, pat)))
             if os.path.isfile(f)
             and not any(p.startswith("_") for p in os.path.relpath(f, path).split(os.sep))]
    if not files:
        raise ValueError(f"{where} holds no Parquet shards and is not a save_to_disk folder; "
                         f"accepted:\n{describe_formats()}")
    _one_split(where, files, base=path)
    return _read_parquet(files)


def _json_lines(text: str) -> list[Any]:
    rows: list[Any] = []
    for line in text.split("\n"):  # not splitlines(): JSON strings may hold a raw U+2028
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append(ValueError(f"not JSON: {e}"))
    return rows


def _read_json(path: str, question_cols: tuple[str, ...]) -> list[Any]:
    """Rows of a ``.json`` file: one array, one object holding one array (``{"data": [...]}``),
    one record, or JSON lines."""
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("["):
            raise ValueError(f"{_where(path)}: not valid JSON: {e}") from None
        return _json_lines(text)
    if isinstance(data, list):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{_where(path)}: expected JSON objects, got a {type(data).__name__}")
    lists = [k for k, v in data.items() if isinstance(v, list)]
    if not lists or any(c in data for c in question_cols):
        return [data]  # a single record
    if len(lists) > 1:
        raise ValueError(f"{_where(path)}: an object with several lists ({', '.join(lists)}); "
                         "expected an array of rows or an object holding one")
    return data[lists[0]]


def _read_csv(path: str) -> tuple[list[str], list[Any]]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # code tests can be long cells
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows: list[Any] = []
        try:
            for row in reader:
                rows.append(ValueError(f"{len(header) + len(row[None])} cells, the header has "
                                       f"{len(header)}") if None in row else row)
        except csv.Error as e:
            raise ValueError(f"{_where(path)}: not valid CSV (line {reader.line_num}): {e}") from None
    return header, rows


def _read(path: str, question_cols: tuple[str, ...]):
    """``(column names, rows)`` of ``path``: rows is a pyarrow Table or a list (a row that could not
    be parsed is a ValueError)."""
    if os.path.isdir(path):
        return _columns(_read_folder(path))
    if not os.path.exists(path):
        matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else []
        if not matches:
            raise ValueError(f"data {path!r}: no such file or folder")
        if not all(m.endswith(".parquet") and os.path.isfile(m) for m in matches):
            raise ValueError(f"data {path!r}: a glob must match only .parquet files")
        _one_split(f"data {path!r}", matches)
        return _columns(_read_parquet(matches))
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        return _columns(_read_parquet([path]))
    if ext == ".arrow":
        return _columns(_read_arrow_stream([path]))
    if ext == ".csv":
        return _read_csv(path)
    if ext == ".jsonl":
        with open(path, encoding="utf-8-sig") as f:
            return _columns(_json_lines(f.read()))
    if ext == ".json":
        return _columns(_read_json(path, question_cols))
    raise ValueError(f"{_where(path)}: cannot read {ext or 'a file without extension'}; accepted:\n"
                     f"{describe_formats()}")


def _columns(rows):
    """``(column names, rows)``: a Table's columns, or the keys of a list's objects in order of
    first appearance."""
    if not isinstance(rows, list):
        return rows.column_names, rows
    return list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r)), rows


def _read_or_explain(path: str, question_cols: tuple[str, ...]):
    """:func:`_read`, with a file that cannot be parsed reported as ValueError naming it."""
    try:
        return _read(path, question_cols)
    except Exception as e:
        import pyarrow as pa  # ArrowInvalid: a corrupt or non-Parquet file, mismatched shards...
        if isinstance(e, (OSError, UnicodeDecodeError, json.JSONDecodeError, pa.ArrowException)):
            raise ValueError(f"{_where(path)}: cannot read: {e}") from e
        raise


def read_rows(path: str) -> list[dict]:
    """The rows of any of ``FORMATS`` as plain dicts (no record checks; e.g. preference pairs)."""
    _, rows = _read_or_explain(os.fspath(path), _DEFAULTS["question"])
    return [r for r in (rows if isinstance(rows, list) else rows.to_pylist()) if isinstance(r, dict)]


def load_prompts(path: str, columns: dict[str, str] | None = None
                 ) -> tuple[list[PromptRecord], dict[str, int]]:
    """Load records from ``path`` (any of ``FORMATS``); returns ``(records, {"skipped_<reason>": n})``.

    ``columns`` maps a record field (``FIELDS``) to the source column holding it, e.g.
    ``{"question": "problem", "answer": "solution"}``; an unmapped field keeps its default columns
    (question: ``question``/``prompt``/``problem``, answer: ``answer``/``solution_answer``, else the
    field's name). A math answer holding ``####`` (GSM8K) is the text after the last ``####``, and
    its reasoning becomes the gold ``solution`` where the row has none. Raises ValueError on an
    unknown field, a mapped column the data lacks, an unreadable path or format, and data with no
    usable row."""
    path = os.fspath(path)
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in FIELDS]
    if unknown:
        raise ValueError(f"data.columns: unknown field(s) {', '.join(map(str, unknown))}; "
                         f"allowed: {', '.join(FIELDS)}")
    for k, v in columns.items():
        if not isinstance(v, str) or not v:
            raise ValueError(f"data.columns.{k}: expected a column name, got {v!r}")
    where = _where(path)
    question_cols = (columns["question"],) if "question" in columns else _DEFAULTS["question"]
    names, rows = _read_or_explain(path, question_cols)
    for f, c in columns.items():
        if c not in names:
            raise ValueError(f"{where}: column {c!r} (data.columns.{f}) not found; "
                             f"columns: {', '.join(names) or '(none)'}")
    if not isinstance(rows, list):
        rows = rows.to_pylist()
    out, skipped = [], {}
    for i, row in enumerate(rows):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise ValueError("row is not an object")
            out.append(_record_from_row(i, row, path, columns))
        except ValueError as e:
            n = skipped["skipped_malformed"] = skipped.get("skipped_malformed", 0) + 1
            if n <= _MAX_LOGGED:
                log.warning("%s row %d skipped: %s", path, i, e)
    if skipped.get("skipped_malformed", 0) > _MAX_LOGGED:
        log.warning("%s: %d more malformed rows skipped (%d in all)", path,
                    skipped["skipped_malformed"] - _MAX_LOGGED, skipped["skipped_malformed"])
    if not out:
        raise ValueError(f"{where} has no usable rows ({skipped}); columns: "
                         f"{', '.join(names) or '(none)'} (data.columns maps {', '.join(FIELDS)} "
                         "to other columns)")
    return out, skipped


def _is_heldout(key: str, fraction: float) -> bool:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


COT_WORDS = {"en": {"+": "plus", "-": "minus", "=": "is"}, "el": {"+": "συν", "-": "μειον", "=": "ισον"}}
"""The arithmetic task's worded chains of thought (``cot='words'``): English, and Greek as the
other language of a mixed-language cold start (R1's language-mixing problem in miniature)."""
GREEK_CHARS = "".join(sorted(set("".join(COT_WORDS["el"].values()))))
"""The letters the Greek chains of thought use: the tiny model needs them (model.tiny.extra_chars)."""


def arithmetic(split: str, seed: int = 0, max_operand: int = 50, heldout_fraction: float = 0.1,
               ops: str = "+-", cot: str = "compact", cot_mix: float = 0.0) -> list[PromptRecord]:
    """Seeded synthetic arithmetic: ``a+b`` and ``a-b`` with ``0 <= a, b < max_operand``.

    The train and held-out splits are disjoint by problem (a hash of the problem decides; ``a+b``
    and ``b+a`` count as one problem and always land on the same side), and
    each split is shuffled with ``seed``. Every record carries a gold ``solution`` in the R1 format,
    its chain of thought ``3+4=7`` (``cot='compact'``) or ``3 plus 4 is 7`` (``cot='words'``); with
    ``cot_mix`` > 0 that share of the problems (by hash) is worded in Greek, ``3 συν 4 ισον 7``.
    """
    if cot not in ("compact", "words"):
        raise ValueError(f"cot must be 'compact' or 'words', got {cot!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    recs = []
    for op in ops:
        for a in range(max_operand):
            for b in range(max_operand):
                q = f"{a}{op}{b}"
                # a+b and b+a are one problem to the split (else the held-out set is half-seen)
                key = f"{min(a, b)}+{max(a, b)}" if op == "+" else q
                if _is_heldout(key, heldout_fraction) != (split == "test"):
                    continue
                ans = a + b if op == "+" else a - b
                if cot == "compact":
                    thought = f"{a}{op}{b}={ans}"
                else:
                    w = COT_WORDS["el" if _is_heldout(f"lang:{q}", cot_mix) else "en"]
                    thought = f"{a} {w[op]} {b} {w['=']} {ans}"
                recs.append(PromptRecord(
                    id=f"arith:{q}", question=f"What is {a} {op} {b}?", answer=str(ans),
                    solution=f" {thought} </think> <answer> {ans} </answer>"))
    random.Random(seed).shuffle(recs)
    return recs


def fit_prompts(records: list[PromptRecord], tokenizer, template: str, max_model_len: int,
                max_tokens: int, where: str = "data") -> tuple[list[PromptRecord], dict[str, int]]:
    """Keep the records whose rendered prompt leaves ``max_tokens`` of room in ``max_model_len``
    (vLLM rejects longer requests, and a prompt that can never fit would fail every request).
    Returns ``(kept, {"skipped_prompt_too_long": n})``; an error, before any actor starts, when
    none fits."""
    from rollout.templates import encode_prompt, render

    limit = max_model_len - max_tokens
    kept, longest = [], 0
    for r in records:
        n = len(encode_prompt(tokenizer, render(template, r.question, tokenizer)))
        if n <= limit:
            kept.append(r)
        longest = max(longest, n)
    skipped = len(records) - len(kept)
    if records and not kept:
        raise ValueError(f"{where}: every prompt is longer than rollout.max_model_len - "
                         f"rollout.max_tokens = {max_model_len} - {max_tokens} = {limit} tokens "
                         f"(longest {longest}); raise max_model_len or shorten the prompts")
    if skipped:
        log.warning("%s: %d of %d prompts skipped: longer than max_model_len - max_tokens = %d tokens "
                    "(longest %d)", where, skipped, len(records), limit, longest)
    return kept, ({"skipped_prompt_too_long": skipped} if skipped else {})


def overlapping_questions(train: list[PromptRecord], test: list[PromptRecord]) -> list[str]:
    """Questions of ``test`` that also appear in ``train`` (whitespace and case folded): a held-out
    score on them measures memory, not reasoning."""
    norm = lambda q: " ".join(q.split()).casefold()  # noqa: E731
    seen = {norm(r.question) for r in train}
    return [r.question for r in test if norm(r.question) in seen]
