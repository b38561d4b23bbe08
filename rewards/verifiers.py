"""Built-in verifiers: accuracy (math / code), format, language consistency, reward model.

Each is registered by name (see rewards.registry) and is a batched callable
``(inputs: list[RewardInput], ctx: ScoreContext) -> list[Verdict]``.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from fractions import Fraction

from rewards.config import RewardConfig
from rewards.extract import extract_answer, last_answer_block
from rewards.format import format_score
from rewards.pool import Task
from rewards.registry import Verdict, register
from rewards.types import RewardInput


_INT = re.compile(r"[+-]?\d{1,400}")
_NUM = re.compile(r"[+-]?(\d{1,400}(\.\d{0,400})?|\.\d{1,400})(/\d{1,400})?")


def fast_math_check(gold: str, pred: str) -> tuple[float, str] | None:
    """Decide plain numbers in the parent, without a worker; None means 'ask math-verify'.

    Integers on both sides decide both ways. Other plain numbers (decimals, a/b) decide only when
    exactly equal, because math-verify also accepts values equal after rounding (0.3333333 = 1/3).

    >>> fast_math_check("42", "42"), fast_math_check("42", "41"), fast_math_check("0.5", "1/2")
    ((1.0, 'ok'), (0.0, 'wrong'), (1.0, 'ok'))
    >>> fast_math_check("1/3", "0.3333333") is None
    True
    """
    g, p = gold.strip(), pred.strip()
    if _INT.fullmatch(g) and _INT.fullmatch(p):
        return (1.0, "ok") if int(g) == int(p) else (0.0, "wrong")
    if _NUM.fullmatch(g) and _NUM.fullmatch(p):
        try:
            if Fraction(g) == Fraction(p):
                return 1.0, "ok"
        except (ValueError, ZeroDivisionError):
            return None
    return None


class MathAccuracy:
    """math-verify equivalence of the extracted answer (rewards.extract) to ``RewardInput.answer``.

    Checks run in the pool's killable workers. Identical (gold, answer) pairs are checked once per
    batch, and definite results (not timeouts or crashes) are remembered in an LRU cache, since a
    GRPO group often repeats the same final answer.

    Plain numbers are decided in the parent first (fast_math_check), which makes a batch of
    integer answers nearly free. A response cut at max_tokens (``meta["finish_reason"] ==
    "length"``) with no closed ``<answer>`` block scores 0 with reason ``truncated``, whatever its
    unfinished reasoning boxed.

    Options (``config.options["accuracy"]``): ``max_answer_chars`` (default 2000; longer answers
    score 0 with reason ``answer_too_long`` without being parsed), ``cache_size`` (default 65536).
    """

    def __init__(self, config: RewardConfig):
        opts = config.options.get("accuracy", {})
        self.timeout_s = config.timeout_s
        self.max_answer_chars = int(opts.get("max_answer_chars", 2000))
        self.cache_size = int(opts.get("cache_size", 65536))
        self.cache: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()

    def check(self, pairs: list[tuple[str, str]], ctx, uses: list[int] | None = None,
              prefix: str = "") -> list[tuple[float, str]]:
        """``(score, reason)`` of each distinct ``(gold, pred)`` pair: the fast path, then the
        cache, then one batch in the pool's killable workers; failures (timeouts, crashes) score 0
        and are counted. ``uses[i]`` is how many samples pair i stands for (counters are per
        sample); ``prefix`` keeps other callers' counts apart (the cons@k vote uses ``vote_``)."""
        uses = uses or [1] * len(pairs)
        out: list[tuple[float, str] | None] = [None] * len(pairs)
        todo: list[int] = []
        for i, key in enumerate(pairs):
            fast = fast_math_check(*key)
            if fast is not None:
                ctx.count(f"{prefix}math_fast_path", uses[i])
                ctx.count(f"{prefix}verifications", uses[i])
                out[i] = fast
            elif key in self.cache:
                self.cache.move_to_end(key)
                ctx.count(f"{prefix}math_cache_hits", uses[i])
                out[i] = self.cache[key]
            else:
                todo.append(i)
        if todo:
            outcomes = ctx.pool.run([Task("math", pairs[i], self.timeout_s) for i in todo])
            ctx.count(f"{prefix}verifications", len(todo))
            for i, o in zip(todo, outcomes):
                if o.ok:
                    out[i] = (float(o.value), o.reason)
                    self.cache[pairs[i]] = out[i]
                    if len(self.cache) > self.cache_size:
                        self.cache.popitem(last=False)
                else:
                    out[i] = (0.0, o.reason)
                    ctx.count_failure(o.reason)
        return out  # type: ignore[return-value]

    def __call__(self, inputs: list[RewardInput], ctx) -> list[Verdict]:
        out: list[Verdict | None] = [None] * len(inputs)
        todo: dict[tuple[str, str], list[int]] = {}
        for i, x in enumerate(inputs):
            if not isinstance(x.answer, str) or not x.answer.strip():
                out[i] = Verdict(0.0, "no_gold_answer")
                continue
            if not isinstance(x.response, str):
                out[i] = Verdict(0.0, "bad_response_type")
                continue
            if (isinstance(x.meta, dict) and x.meta.get("finish_reason") == "length"
                    and last_answer_block(x.response) is None):
                # cut at max_tokens before any <answer> block closed: a \boxed{} in the
                # unfinished reasoning is not a final answer
                out[i] = Verdict(0.0, "truncated")
                continue
            pred, why = extract_answer(x.response)
            if pred is None:
                out[i] = Verdict(0.0, why)
            elif len(pred) > self.max_answer_chars or len(x.answer) > self.max_answer_chars:
                out[i] = Verdict(0.0, "answer_too_long")
            else:
                todo.setdefault((x.answer.strip(), pred), []).append(i)
        keys = list(todo)
        for key, (score, reason) in zip(keys, self.check(keys, ctx, [len(todo[k]) for k in keys])):
            for i in todo[key]:
                out[i] = Verdict(score, reason)
        return out  # type: ignore[return-value]


class Accuracy:
    """Dispatches on ``RewardInput.task``: 'math' -> MathAccuracy, 'code' -> CodeAccuracy."""

    def __init__(self, config: RewardConfig):
        self.math = MathAccuracy(config)
        self.config = config
        self._code = None

    def __call__(self, inputs: list[RewardInput], ctx) -> list[Verdict]:
        out: list[Verdict | None] = [None] * len(inputs)
        groups: dict[str, list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x.task, []).append(i)
        for task, idx in groups.items():
            if task == "math":
                verdicts = self.math([inputs[i] for i in idx], ctx)
            elif task == "code":
                if self._code is None:
                    from rewards.code import CodeAccuracy
                    self._code = CodeAccuracy(self.config)
                verdicts = self._code([inputs[i] for i in idx], ctx)
            else:
                verdicts = [Verdict(0.0, f"unknown_task {task!r}; known: code, math")] * len(idx)
            for i, v in zip(idx, verdicts):
                out[i] = v
        return out  # type: ignore[return-value]


@register("accuracy")
def _accuracy(config: RewardConfig) -> Accuracy:
    return Accuracy(config)


@register("format")
def _format(config: RewardConfig):
    def verify(inputs: list[RewardInput], ctx) -> list[Verdict]:
        return [Verdict(*format_score(x.response)) if isinstance(x.response, str)
                else Verdict(0.0, "bad_response_type") for x in inputs]
    return verify


@register("language")
def _language(config: RewardConfig):
    from rewards.language import LanguageConsistency
    return LanguageConsistency(config)


@register("reward_model")
def _reward_model(config: RewardConfig):
    from rewards.reward_model import RewardModelVerifier
    return RewardModelVerifier(config)
