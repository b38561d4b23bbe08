"""Format reward (R1-Zero): ``<think>…</think>`` then ``<answer>…</answer>``, nothing substantive after.

The R1-Zero prompt template ends with ``Assistant: <think>``, so a completion usually starts INSIDE
the think block. A response with no ``<think>`` before its first ``</think>`` is therefore read as if
``<think>`` had been written just before it.

Accepted: whitespace around and between the blocks, and end-of-sequence markers after the answer
(``<|endoftext|>``, ``<|im_end|>``, ``</s>``, ``<|end_of_sentence|>`` variants).
Refused, each with its reason: a missing or repeated tag, tags nested in the wrong block, an empty
think or answer block, and text after ``</answer>``.

>>> format_score("<think>a</think> <answer>b</answer>")
(1.0, 'ok')
>>> format_score("reasoning here</think><answer>42</answer>")
(1.0, 'ok')
>>> format_score("<think>a</think><answer>b</answer> and more")
(0.0, 'text_after_answer')
"""
from __future__ import annotations

import re

_EOS_RE = re.compile(r"(?:\s|<\|endoftext\|>|<\|im_end\|>|</s>|<\|end[▁_ ]of[▁_ ]sentence\|>|<｜end▁of▁sentence｜>)*\Z")
_TAGS = ("</think>", "<think>", "<answer>", "</answer>")


def format_score(response: str) -> tuple[float, str]:
    """(1.0, 'ok') when the response has the R1 layout, else (0.0, reason)."""
    text = response
    close = text.find("</think>")
    if close != -1 and text.find("<think>", 0, close) == -1:
        text = "<think>" + text
    for tag in _TAGS:
        k = text.count(tag)
        if k == 0:
            return 0.0, f"missing {tag}"
        if k > 1:
            return 0.0, f"repeated {tag}"
    if text[:text.find("<think>")].strip():
        return 0.0, "text_before_think"
    i_ot, i_ct = text.find("<think>"), text.find("</think>")
    i_oa, i_ca = text.find("<answer>"), text.find("</answer>")
    if not (i_ot < i_ct < i_oa < i_ca):
        return 0.0, "tags_out_of_order"
    if not text[i_ot + len("<think>"):i_ct].strip():
        return 0.0, "empty_think"
    if text[i_ct + len("</think>"):i_oa].strip():
        return 0.0, "text_between_blocks"
    if not text[i_oa + len("<answer>"):i_ca].strip():
        return 0.0, "empty_answer"
    if not _EOS_RE.match(text, i_ca + len("</answer>")):
        return 0.0, "text_after_answer"
    return 1.0, "ok"
