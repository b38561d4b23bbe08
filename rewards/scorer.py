"""Weighted composition of verifiers, batched, over one pool of killable workers.

>>> from rewards import build_scorer, RewardConfig, RewardInput
>>> scorer = build_scorer(RewardConfig(weights={"accuracy": 1.0, "format": 0.1}))
>>> r = scorer.score_batch([RewardInput("2+2 is 4</think> <answer>4</answer>", answer="4")])[0]
>>> (r.score, r.components, r.reason)
(1.1, {'accuracy': 1.0, 'format': 1.0}, 'ok')
>>> scorer.close()

``score_batch`` never raises for a bad sample: every failure becomes a 0 component with a reason,
and is counted in ``stats()``. The headline ``RewardResult.reason`` is the accuracy reason when
accuracy is configured, otherwise the first non-'ok' component reason.
"""
from __future__ import annotations

import time
from collections import Counter

from rewards.config import RewardConfig
from rewards.pool import WorkerPool
from rewards.reflection import count_reflection_words
from rewards.registry import Verdict, get_factory
from rewards.types import RewardInput, RewardResult


def reason_kind(reason: str) -> str:
    """The category of a reason string: 'timeout (0/3 passed): ...' -> 'timeout'."""
    return reason.split(":")[0].split(" (")[0].strip() or "unknown"


class ScoreContext:
    """What verifiers share: the config, the worker pool (started on first use) and counters."""

    def __init__(self, config: RewardConfig):
        self.config = config
        self.counters: Counter[str] = Counter()
        self._pool: WorkerPool | None = None
        self._code_pool: WorkerPool | None = None

    @property
    def pool(self) -> WorkerPool:
        """Math workers, isolated per ``config.isolation``."""
        if self._pool is None:
            self._pool = WorkerPool(self.config.workers_per_actor, isolated=self.config.isolation == "sandbox",
                                    memory_mb=self.config.worker_memory_mb)
        return self._pool

    @property
    def code_pool(self) -> WorkerPool:
        """Code-test harness workers: not isolated themselves (each starts a sandbox per program
        run, which a sandboxed worker could not), they only compare outputs and values."""
        if self._code_pool is None:
            self._code_pool = WorkerPool(self.config.workers_per_actor)
        return self._code_pool

    def pools(self) -> list[WorkerPool]:
        return [p for p in (self._pool, self._code_pool) if p is not None]

    def count(self, key: str, n: float = 1) -> None:
        self.counters[key] += n

    def count_failure(self, reason: str) -> None:
        kind = reason_kind(reason)
        if kind == "timeout":
            self.counters["timeouts"] += 1
        else:
            self.counters["errors"] += 1
        self.counters[f"errors/{kind}"] += 1

    def close(self) -> None:
        for p in self.pools():
            p.close()
        self._pool = self._code_pool = None


class Scorer:
    """Scores batches of RewardInput with the verifiers named in ``config.weights``."""

    def __init__(self, config: RewardConfig):
        config.validate()
        self.config = config
        self.verifiers = {name: get_factory(name)(config) for name in config.weights}
        self.ctx = ScoreContext(config)
        self._vote_math = None  # equal_answers' checker when "accuracy" is not configured
        self._busy_s = 0.0
        self._created = time.monotonic()

    def warm_up(self) -> None:
        """Start the worker processes now instead of on the first batch (optional)."""
        self.ctx.pool.wait_ready()

    def score_batch(self, inputs: list[RewardInput]) -> list[RewardResult]:
        """One RewardResult per input, same order. Never raises for a bad sample."""
        t0 = time.monotonic()
        inputs = list(inputs)
        n = len(inputs)
        per: dict[str, list[Verdict]] = {}
        for name, verifier in self.verifiers.items():
            try:
                verdicts = list(verifier(inputs, self.ctx))
                if len(verdicts) != n:
                    raise RuntimeError(f"returned {len(verdicts)} verdicts for {n} inputs")
            except Exception as e:  # noqa: BLE001
                reason = f"verifier_error: {name}: {type(e).__name__}: {str(e)[:200]}"
                self.ctx.count_failure("verifier_error")
                verdicts = [Verdict(0.0, reason)] * n
            per[name] = verdicts
        results = []
        for i, x in enumerate(inputs):
            components = {name: float(per[name][i].score) for name in self.verifiers}
            reasons = {name: per[name][i].reason for name in self.verifiers}
            # a prompt set may carry its own weights (RewardInput.meta["reward_weights"], e.g. rule
            # rewards for reasoning prompts and the reward model for the rest of one batch)
            weights = x.meta.get("reward_weights") or self.config.weights
            score = sum(weights.get(name, 0.0) * components[name] for name in self.verifiers)
            if "accuracy" in reasons:
                reason = reasons["accuracy"]
            else:
                reason = next((r for r in reasons.values() if r != "ok"), "ok")
            metrics: dict[str, float] = {}
            for name in self.verifiers:
                metrics.update(per[name][i].metrics)
            text = x.response if isinstance(x.response, str) else ""
            metrics["reflection_words"] = float(count_reflection_words(text))
            metrics["response_chars"] = float(len(text))
            results.append(RewardResult(score=round(score, 10), components=components, reason=reason,
                                        metrics=metrics, reasons=reasons))
            self.ctx.counters[f"reasons/{reason_kind(reason)}"] += 1
        self.ctx.counters["samples"] += n
        self.ctx.counters["batches"] += 1
        self._busy_s += time.monotonic() - t0
        return results

    def equal_answers(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Whether each pair of extracted answers is mathematically equivalent: the accuracy
        verifier's own check (``MathAccuracy.check``: fast path, cache, math-verify in the
        killable workers), counted under ``vote_*``. A check that times out or crashes counts as
        not equal (and is counted as a failure)."""
        from rewards.verifiers import MathAccuracy

        math = getattr(self.verifiers.get("accuracy"), "math", None)
        if math is None:  # a scorer without the accuracy verifier still votes the same way
            if self._vote_math is None:
                self._vote_math = MathAccuracy(self.config)
            math = self._vote_math
        pairs = [(a.strip(), b.strip()) for a, b in pairs]
        return [score == 1.0 for score, _ in math.check(pairs, self.ctx, prefix="vote_")]

    def vote(self, groups: list[tuple[list[str | None], list[float]]]) -> list[float]:
        """cons@k of each ``(answers, correctness)`` group, clustering answers by equivalence
        (rewards.vote). All the pairs any group needs are checked in one batch."""
        from rewards.vote import majority_vote

        pairs: list[tuple[str, str]] = []
        for answers, _ in groups:
            distinct = sorted({a.strip() for a in answers if a is not None and a.strip()})
            pairs += [(x, y) for i, x in enumerate(distinct) for y in distinct[i + 1:]]
        pairs = list(dict.fromkeys(pairs))
        equal = dict(zip(pairs, self.equal_answers(pairs)))
        return [majority_vote(answers, correct, lambda x, y: x == y or equal.get((x, y), False))
                for answers, correct in groups]

    def stats(self) -> dict[str, float]:
        """Cumulative counters: samples, verifications, verifications_per_s (over time spent in
        score_batch), timeouts, errors and errors/<kind>, reasons/<reason>, worker starts/kills."""
        out = {k: float(v) for k, v in self.ctx.counters.items()}
        for k in ("samples", "verifications", "timeouts", "errors"):
            out.setdefault(k, 0.0)
        out["busy_s"] = self._busy_s
        out["verifications_per_s"] = out["verifications"] / self._busy_s if self._busy_s > 0 else 0.0
        for pool in self.ctx.pools():
            for k, v in pool.counters.items():
                out[k] = out.get(k, 0.0) + float(v)
        return out

    def close(self) -> None:
        """Kill the worker processes. Idempotent; the scorer restarts them if used again."""
        self.ctx.close()

    def __enter__(self) -> "Scorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_scorer(config: RewardConfig | None = None) -> Scorer:
    """Validate the config (names checked against the registry) and build a Scorer."""
    return Scorer(config or RewardConfig())
