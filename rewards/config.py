"""Typed reward configuration: which verifiers, their weights, and the pool that runs them."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    """Verifier name -> weight; the reward is the weighted sum. Unknown names raise and list the known."""
    num_actors: int = 1
    """CPU reward actors in the pool."""
    workers_per_actor: int = 1
    """Killable worker processes per actor (math checks and sandboxed code run there)."""
    timeout_s: float = 5.0
    """Per-verification wall-clock limit; past it the sample scores 0 with reason 'timeout'."""
    code_reward: str = "fraction"
    """Code tasks: 'fraction' of tests passed or 'all_or_nothing'."""
    language: str = "en"
    """Target language of the chain of thought (language-consistency reward)."""
    isolation: str = "sandbox"
    """Math workers (they parse model output with sympy / latex2sympy): 'sandbox' runs each in
    bubblewrap with the code sandbox's seccomp filter, no network, a read-only view of the
    interpreter only and, as root, a fresh uid (rewards.sandbox.worker_command); 'none' runs them
    as plain subprocesses. Code tasks run every program in its own sandbox either way."""
    worker_memory_mb: int = 4096
    """Address-space limit of each isolated math worker."""
    options: dict = field(default_factory=dict)
    """Verifier-specific options, by verifier name."""

    def validate(self, where: str = "reward") -> None:
        if not self.weights:
            raise ValueError(f"{where}.weights is empty: name at least one verifier, e.g. {{accuracy: 1.0}}")
        if self.num_actors < 1:
            raise ValueError(f"{where}.num_actors must be >= 1, got {self.num_actors}")
        if self.workers_per_actor < 1:
            raise ValueError(f"{where}.workers_per_actor must be >= 1, got {self.workers_per_actor}")
        if self.timeout_s <= 0:
            raise ValueError(f"{where}.timeout_s must be > 0, got {self.timeout_s}")
        if self.code_reward not in ("fraction", "all_or_nothing"):
            raise ValueError(f"{where}.code_reward must be 'fraction' or 'all_or_nothing', got {self.code_reward!r}")
        if self.isolation not in ("sandbox", "none"):
            raise ValueError(f"{where}.isolation must be 'sandbox' or 'none', got {self.isolation!r}")
        if self.worker_memory_mb < 512:
            raise ValueError(f"{where}.worker_memory_mb must be >= 512 (a math worker imports sympy), got {self.worker_memory_mb}")
        mode = (self.options.get("code") or {}).get("in_sandbox_checks", "allow")
        if mode not in ("allow", "refuse"):
            raise ValueError(f"{where}.options.code.in_sandbox_checks must be 'allow' or 'refuse', got {mode!r}")
