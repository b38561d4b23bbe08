"""Verifier registry: name -> factory. Unknown names raise an error listing the known ones.

A verifier is a batched callable ``verifier(inputs, ctx) -> list[Verdict]`` (same length, same order).
It may raise; the Scorer then gives every sample in the batch 0 for that component with the reason
``verifier_error: ...`` and counts it, so one broken verifier never loses a sample.

>>> sorted(known_verifiers())[:2]
['accuracy', 'format']
>>> get_factory("acuracy")
Traceback (most recent call last):
...
KeyError: "unknown verifier 'acuracy'; known: accuracy, format, language, reward_model"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from rewards.config import RewardConfig
from rewards.types import RewardInput


@dataclass
class Verdict:
    score: float
    reason: str = "ok"
    metrics: dict[str, float] = field(default_factory=dict)


class Verifier(Protocol):
    def __call__(self, inputs: list[RewardInput], ctx: Any) -> list[Verdict]: ...


Factory = Callable[[RewardConfig], Verifier]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: ``@register("myname")`` on a factory ``f(config) -> verifier``."""
    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"verifier {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return deco


def known_verifiers() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_factory(name: str) -> Factory:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown verifier {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _load_builtins() -> None:
    import rewards.verifiers  # noqa: F401  (registers the built-in verifiers)
