"""Reflection-word counter (R1 paper, 'aha moment' analysis): reported in metrics, never rewarded.

>>> count_reflection_words("Wait, that is wrong. Let me verify: however...")
4
"""
from __future__ import annotations

import re

REFLECTION_WORDS = ("wait", "mistake", "however", "but", "retry", "error", "verify", "wrong",
                    "evaluate", "check", "recheck", "re-check", "reconsider", "alternatively", "hmm")
"""The words the R1 paper tracks over training (plus a few close variants)."""

_RE = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(w) for w in REFLECTION_WORDS) + r")(?![\w-])",
                 re.IGNORECASE)


def count_reflection_words(text: str) -> int:
    """Whole-word, case-insensitive occurrences of REFLECTION_WORDS in text."""
    return len(_RE.findall(text))
