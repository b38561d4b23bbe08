"""Pull the final answer out of a completion: pure string functions, no math library.

Rules (what the ``accuracy`` verifier sees):

1. If the response has an ``<answer>…</answer>`` block, the region is the content of the LAST one;
   otherwise the region is the whole response.
2. Inside the region, ``\\boxed{…}`` (also ``\\fbox{…}``) groups are found with brace matching.
   Two or more boxes with different contents earn no credit (reason ``multiple_boxed``): a model must
   not hedge by boxing several candidates. The same content boxed twice counts once.
3. One box: its content is the answer. No box: inside an ``<answer>`` block the whole block is the
   answer; with no ``<answer>`` block and no box there is no answer (reason ``no_answer``).

>>> extract_answer("<think>2+2</think><answer>4</answer>")
('4', 'ok')
>>> extract_answer("so \\\\boxed{3} or \\\\boxed{4}")
(None, 'multiple_boxed')
"""
from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "</answer>"


def last_answer_block(text: str) -> str | None:
    """Content of the last complete ``<answer>…</answer>`` block, or None."""
    end = text.rfind(_ANSWER_CLOSE)
    while end != -1:
        start = text.rfind(_ANSWER_OPEN, 0, end)
        if start != -1:
            return text[start + len(_ANSWER_OPEN):end]
        end = text.rfind(_ANSWER_CLOSE, 0, end)
    return None


def boxed_contents(text: str) -> tuple[list[str], bool]:
    """All ``\\boxed{…}`` contents in order, and whether one was left unclosed (unbalanced braces)."""
    out: list[str] = []
    unbalanced = False
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return out, unbalanced
        depth, i = 1, m.end()
        n = len(text)
        while i < n and depth:
            c = text[i]
            if c == "\\" and i + 1 < n:  # skip escaped char (\{ \} are literal braces in sets)
                i += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth:
            return out, True
        out.append(text[m.end():i - 1])
        pos = i


def extract_answer(response: str) -> tuple[str | None, str]:
    """(answer text, reason). reason is 'ok', 'no_answer', 'multiple_boxed' or 'unbalanced_braces'."""
    block = last_answer_block(response)
    region = response if block is None else block
    boxes, unbalanced = boxed_contents(region)
    distinct = list(dict.fromkeys(b.strip() for b in boxes))
    if len(distinct) > 1:
        return None, "multiple_boxed"
    if len(distinct) == 1:
        return (distinct[0], "ok") if distinct[0] else (None, "no_answer")
    if unbalanced:
        return None, "unbalanced_braces"
    if block is None or not block.strip():
        return None, "no_answer"
    return block.strip(), "ok"
