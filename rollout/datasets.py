"""Prompt datasets: records with a checkable answer, loaded from Parquet/JSONL or generated.

A record is ``{"id", "question", "answer", "task", "tests"?}``. ``load_prompts`` reads a file (Parquet
through pyarrow, or JSON lines); malformed rows are skipped, counted and logged, never silently lost.
``arithmetic`` is the built-in seeded synthetic task of the demo, with disjoint train and held-out
splits and gold reasoning traces for cold-start SFT.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


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


def _record_from_row(i: int, row: dict, source: str) -> PromptRecord:
    q = row.get("question", row.get("prompt", row.get("problem")))
    a = row.get("answer", row.get("solution_answer"))
    task = row.get("task", "math")
    if not isinstance(q, str) or not q.strip():
        raise ValueError("missing 'question' (or 'prompt'/'problem') text")
    if task == "math" and (a is None or str(a).strip() == ""):
        raise ValueError("math row without 'answer'")
    if task == "code" and not row.get("tests"):
        raise ValueError("code row without 'tests'")
    return PromptRecord(id=str(row.get("id", f"{source}:{i}")), question=q, answer=str(a or ""),
                        task=task, tests=row.get("tests"), solution=row.get("solution"))


def load_prompts(path: str) -> tuple[list[PromptRecord], dict[str, int]]:
    """Load records from ``.parquet`` or ``.jsonl``; returns ``(records, {"skipped_<reason>": n})``."""
    rows: list[Any]
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    elif path.endswith((".jsonl", ".json")):
        rows = []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(e)
    else:
        raise ValueError(f"data file {path!r}: expected .parquet or .jsonl")
    out, skipped = [], {}
    for i, row in enumerate(rows):
        try:
            if isinstance(row, Exception):
                raise ValueError(f"not JSON: {row}")
            if not isinstance(row, dict):
                raise ValueError("row is not an object")
            out.append(_record_from_row(i, row, path))
        except ValueError as e:
            key = "skipped_malformed"
            skipped[key] = skipped.get(key, 0) + 1
            log.warning("%s row %d skipped: %s", path, i, e)
    if not out:
        raise ValueError(f"data file {path!r} has no usable rows ({skipped})")
    return out, skipped


def _is_heldout(key: str, fraction: float) -> bool:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def arithmetic(split: str, seed: int = 0, max_operand: int = 50, heldout_fraction: float = 0.1,
               ops: str = "+-") -> list[PromptRecord]:
    """Seeded synthetic arithmetic: ``a+b`` and ``a-b`` with ``0 <= a, b < max_operand``.

    The train and held-out splits are disjoint by problem (a hash of the problem decides; ``a+b``
    and ``b+a`` count as one problem and always land on the same side), and
    each split is shuffled with ``seed``. Every record carries a gold ``solution`` in the R1 format.
    """
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
                recs.append(PromptRecord(
                    id=f"arith:{q}", question=f"What is {a} {op} {b}?", answer=str(ans),
                    solution=f" {a}{op}{b}={ans} </think> <answer> {ans} </answer>"))
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
        n = len(encode_prompt(tokenizer, render(template, r.question)))
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
