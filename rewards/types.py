"""What a verifier takes and returns. Plain data, usable without Ray."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardInput:
    response: str
    """The completion text (what the model wrote after the prompt)."""
    answer: str | None = None
    """Ground truth for math tasks (any form math-verify parses: number, fraction, LaTeX, set...)."""
    task: str = "math"
    """Which verifier family applies: 'math' or 'code'."""
    prompt: str = ""
    tests: list[dict[str, Any]] | None = None
    """Code tasks: ``[{"stdin": ..., "expected": ...}]`` or ``[{"assert": ...}]`` (see rewards.code)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """``finish_reason``; ``reward_weights``: this input's verifier weights, replacing
    ``RewardConfig.weights`` in its score (every configured verifier still runs and reports)."""


@dataclass
class RewardResult:
    score: float
    """Weighted total of the components (what GRPO uses)."""
    components: dict[str, float] = field(default_factory=dict)
    """Per-verifier scores before weighting, e.g. ``{"accuracy": 1.0, "format": 1.0}``."""
    reason: str = "ok"
    """Why: 'ok', 'wrong', 'no_answer', 'timeout', 'crash', 'sandbox_error', ... (counted in metrics)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Reported but not rewarded, e.g. ``{"reflection_words": 2}``."""
    reasons: dict[str, str] = field(default_factory=dict)
    """Per-verifier reason, e.g. ``{"accuracy": "wrong", "format": "ok"}`` (``reason`` is the headline one)."""
