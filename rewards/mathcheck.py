"""Math equivalence on top of math-verify. Runs INSIDE a pool worker process (see rewards.pool).

``math_equal(gold, pred)`` returns ``(score, reason)``. math-verify's own timeouts use SIGALRM and
are switched off here (``parsing_timeout=None``, ``timeout_seconds=None``): the worker arms its own
alarm around the whole check, and the parent kills the worker if even that does not fire (sympy
stuck inside one long C call, e.g. ``9^{9^{9^9}}``).

How the two sides are parsed:
- gold (dataset answer, bare LaTeX or plain text): parsed as ``$gold$``, falling back to the raw text.
- pred (the extracted answer): bare math is parsed as ``\\boxed{pred}`` (so ``x^2+1`` stays a
  polynomial); text with words or ``$`` is parsed with math-verify's default extraction.
Departures from plain math-verify are pinned in tests/rewards/test_math.py (known false positives).
"""
from __future__ import annotations

import re

_WORDS = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_LATEX_CMD = re.compile(r"\\[a-zA-Z]+(\{[^{}]*\})?")


def _looks_textual(s: str) -> bool:
    if "$" in s:
        return True
    return bool(_WORDS.search(_LATEX_CMD.sub(" ", s)))


def parse_gold(gold: str):
    from math_verify import parse
    g = parse("$" + gold + "$", parsing_timeout=None)
    if not g:
        g = parse(gold, parsing_timeout=None)
    return g


def parse_pred(pred: str):
    from math_verify import parse
    first, second = ("\\boxed{" + pred + "}", pred)
    if _looks_textual(pred):
        first, second = second, first
    p = parse(first, parsing_timeout=None)
    if not p:
        p = parse(second, parsing_timeout=None)
    return p


def math_equal(gold: str, pred: str) -> tuple[float, str]:
    """(1.0, 'ok') if pred is mathematically equal to gold, else (0.0, reason)."""
    from math_verify import verify
    g = parse_gold(gold)
    if not g:
        return 0.0, "gold_unparsable"
    p = parse_pred(pred)
    if not p:
        return 0.0, "unparsable"
    return (1.0, "ok") if verify(g, p, timeout_seconds=None) else (0.0, "wrong")


def warm_up() -> None:
    """Import math-verify and run one check so the first real check pays no import/cache cost."""
    import logging
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    math_equal("\\frac{1}{2}", "0.5")
