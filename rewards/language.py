"""Language-consistency reward (DeepSeek-R1, reasoning RL stage): the share of chain-of-thought words
written in the target language (``RewardConfig.language``).

Departures from the paper, stated:
1. "Words" are found by script, not by a language model: a run of letters of one script is one
   word, except for scripts written without spaces (Han, Hiragana, Katakana, Thai) where each
   character counts as a word. So 'en' means "Latin-script words" (French also counts as 'en').
2. LaTeX commands (``\\frac``), ``\\text{...}`` wrappers, numbers and symbols are ignored; words
   inside code fences are ignored.
3. The CoT is the content of the ``<think>`` block (the text before ``</think>`` when the response
   starts inside the block); with no think block, the whole response. No words: score 0,
   reason ``no_cot_words``.

>>> language_share("Let me think about 这个 problem", "en")  # 5 Latin words, 2 Han characters
(0.714286, 'ok')
>>> language_share("我们 先 计算", "zh")
(1.0, 'ok')
"""
from __future__ import annotations

import re

from rewards.config import RewardConfig
from rewards.registry import Verdict
from rewards.types import RewardInput

SCRIPTS = {
    "latin": r"A-Za-z\u00C0-\u024F",
    "cyrillic": r"\u0400-\u04FF",
    "greek": r"\u0370-\u03FF",
    "arabic": r"\u0600-\u06FF",
    "hebrew": r"\u0590-\u05FF",
    "devanagari": r"\u0900-\u097F",
    "hangul": r"\uAC00-\uD7AF\u1100-\u11FF",
}
PER_CHAR = {
    "han": r"\u4E00-\u9FFF\u3400-\u4DBF",
    "hiragana": r"\u3040-\u309F",
    "katakana": r"\u30A0-\u30FF",
    "thai": r"\u0E00-\u0E7F",
}
LANGUAGES = {
    "en": {"latin"}, "fr": {"latin"}, "de": {"latin"}, "es": {"latin"}, "pt": {"latin"}, "it": {"latin"},
    "zh": {"han"}, "ja": {"han", "hiragana", "katakana"}, "ko": {"hangul", "han"},
    "ru": {"cyrillic"}, "uk": {"cyrillic"}, "el": {"greek"}, "ar": {"arabic"}, "he": {"hebrew"},
    "hi": {"devanagari"}, "th": {"thai"},
}
"""Language code -> the scripts whose words count as that language."""

_TOKEN = re.compile("|".join([f"(?P<{k}>[{v}]+)" for k, v in SCRIPTS.items()] +
                             [f"(?P<{k}>[{v}])" for k, v in PER_CHAR.items()]))
_LATEX = re.compile(r"\\[a-zA-Z]+")
_FENCE = re.compile(r"```.*?(```|\Z)", re.DOTALL)


def chain_of_thought(response: str) -> str:
    close = response.find("</think>")
    if close == -1:
        return response
    start = response.rfind("<think>", 0, close)
    return response[start + len("<think>") if start != -1 else 0:close]


def language_share(text: str, language: str) -> tuple[float, str]:
    """(share of words of ``text`` in ``language``, reason)."""
    if language not in LANGUAGES:
        raise KeyError(f"unknown language {language!r}; known: {', '.join(sorted(LANGUAGES))}")
    target = LANGUAGES[language]
    text = _LATEX.sub(" ", _FENCE.sub(" ", text))
    total = hits = 0
    for m in _TOKEN.finditer(text):
        total += 1
        hits += m.lastgroup in target
    if total == 0:
        return 0.0, "no_cot_words"
    return round(hits / total, 6), "ok"


class LanguageConsistency:
    """Verifier 'language': ``language_share(chain_of_thought(response), config.language)``.
    Reports ``metrics['language_share']`` as well."""

    def __init__(self, config: RewardConfig):
        if config.language not in LANGUAGES:
            raise KeyError(f"unknown language {config.language!r}; known: {', '.join(sorted(LANGUAGES))}")
        self.language = config.language

    def __call__(self, inputs: list[RewardInput], ctx) -> list[Verdict]:
        out = []
        for x in inputs:
            if not isinstance(x.response, str):
                out.append(Verdict(0.0, "bad_response_type"))
                continue
            share, reason = language_share(chain_of_thought(x.response), self.language)
            out.append(Verdict(share, reason, {"language_share": share}))
        return out
