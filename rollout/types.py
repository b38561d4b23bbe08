"""The one sample record that flows end to end, and its Arrow schema.

A :class:`Sample` is created by a rollout engine (prompt, ids, rollout logprobs, weight version),
scored by the reward pool (reward and its components), given an advantage by the controller, trained
on by the learner, and appended to Parquet in the run directory. Batches travel as Arrow record
batches (:func:`to_arrow`, :func:`from_arrow`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import pyarrow as pa


@dataclass
class Sample:
    prompt_id: str
    """Id of the prompt; the G samples of one group share it."""
    group_index: int
    """Which of the group's G completions this is."""
    prompt: str
    response: str
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    """Engine logprob of each sampled response token."""
    weight_version: int
    """Learner version of the weights that generated the sample."""
    finish_reason: str = ""
    """'stop' (EOS or a stop string), 'length' (max_tokens), or an error."""
    answer: str = ""
    task: str = "math"
    reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    reward_reason: str = ""
    advantage: float = 0.0
    step: int = -1
    """Learner step that consumed it (-1 until trained on or for eval samples)."""
    meta: dict[str, Any] = field(default_factory=dict)
    ref_logprobs: list[float] | None = None
    """The frozen KL reference's logprob of each response token, when a reference actor computed
    it (``learner.reference: pool``); ``None`` otherwise."""


ARROW_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("group_index", pa.int32()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("prompt_ids", pa.list_(pa.int32())),
    ("response_ids", pa.list_(pa.int32())),
    ("response_logprobs", pa.list_(pa.float32())),
    ("weight_version", pa.int64()),
    ("finish_reason", pa.string()),
    ("answer", pa.string()),
    ("task", pa.string()),
    ("reward", pa.float32()),
    ("reward_components", pa.map_(pa.string(), pa.float32())),
    ("reward_reason", pa.string()),
    ("advantage", pa.float32()),
    ("step", pa.int64()),
    ("meta", pa.string()),  # JSON
    ("ref_logprobs", pa.list_(pa.float32())),  # null unless learner.reference: pool
])


def to_arrow(samples: Sequence[Sample]) -> pa.RecordBatch:
    # column by column with getattr: dataclasses.asdict deep-copies every token list element by
    # element, which made this 12x slower (7.5 ms for the demo's 128 samples; it runs three times
    # per GRPO step: engine, reward actor, controller)
    cols: dict[str, list] = {}
    for f in fields(Sample):
        col = [getattr(s, f.name) for s in samples]
        if f.name == "reward_components":
            col = [list(v.items()) for v in col]
        elif f.name == "meta":
            col = [json.dumps(v, default=str) for v in col]
        cols[f.name] = col
    return pa.RecordBatch.from_pydict(cols, schema=ARROW_SCHEMA)


def from_arrow(batch: pa.RecordBatch | pa.Table) -> list[Sample]:
    out = []
    for row in batch.to_pylist():
        row["reward_components"] = dict(row["reward_components"] or [])
        row["meta"] = json.loads(row["meta"]) if row["meta"] else {}
        out.append(Sample(**row))
    return out
