"""aha.rewards: rule-based reward verifiers (math, code sandbox, format, language) and their composition.

    from rewards import build_scorer, RewardConfig, RewardInput
    scorer = build_scorer(RewardConfig(weights={"accuracy": 1.0, "format": 0.1}))
    results = scorer.score_batch([RewardInput(response, answer="42")])
    scorer.stats(); scorer.close()

Plain Python: no Ray here (actors/ wraps Scorer).
"""
from rewards.config import RewardConfig
from rewards.registry import Verdict, known_verifiers, register
from rewards.scorer import Scorer, build_scorer
from rewards.types import RewardInput, RewardResult

__all__ = ["RewardConfig", "RewardInput", "RewardResult", "Scorer", "Verdict", "build_scorer",
           "known_verifiers", "register"]
