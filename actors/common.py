"""Fan-out helpers: call every actor of a pool, keep per-actor errors apart, never wait forever."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import ray

log = logging.getLogger(__name__)


class ActorCallError(RuntimeError):
    """One or more actors of a pool failed a call; ``errors`` maps actor index to the exception."""

    def __init__(self, what: str, errors: dict[int, BaseException]):
        self.errors = errors
        detail = "; ".join(f"actor {i}: {type(e).__name__}: {e}" for i, e in errors.items())
        super().__init__(f"{what} failed on {len(errors)} actor(s): {detail}")


def get_all(refs: Sequence[ray.ObjectRef], what: str, timeout_s: float | None) -> list[Any]:
    """``ray.get`` each ref, failing fast: the first failure raises :class:`ActorCallError` (naming
    every actor failed by then) without waiting for the others, which matters when they are blocked
    in a collective the failed one will never join. ``TimeoutError`` names the actors still running
    after ``timeout_s``.

    The other calls are left to finish or fail, never ``ray.cancel``-ed: in Ray 2.60 cancelling an
    actor call that has not reached its actor yet leaves a gap in the actor's call order, and the
    actor then fails every later call with ``ActorUnavailableError`` after 30 s (a learner's next
    weight sync, say). A caller that must stop a hung actor kills or terminates it."""
    import time

    refs = list(refs)
    index = {r: i for i, r in enumerate(refs)}
    results: dict[int, Any] = {}
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            idx = sorted(index[r] for r in pending)
            raise TimeoutError(f"{what}: actor(s) {idx} did not answer within {timeout_s:.0f}s")
        errors = {}
        for r in done:
            try:
                results[index[r]] = ray.get(r)
            except Exception as e:  # noqa: BLE001 - reported per actor below
                errors[index[r]] = e
        if errors:
            raise ActorCallError(what, errors)
    return [results[i] for i in range(len(refs))]


def ref_error(ref: ray.ObjectRef) -> BaseException | None:
    """The error a finished ref holds, or None when it is not done yet or succeeded (no wait)."""
    ready, _ = ray.wait([ref], timeout=0)
    if not ready:
        return None
    try:
        ray.get(ref)
    except Exception as e:  # noqa: BLE001 - returned to the caller to classify
        return e
    return None


def use_cluster_token() -> None:
    """Before ``ray.init(address=HOST:PORT)``: `ray start --head` turns token authentication on
    when ``~/.ray/auth_token`` exists, but a driver joining by address only sends the token once
    RAY_AUTH_MODE says so (Ray 2.60; ``address="auto"`` does this itself). Ray's own helper."""
    try:
        from ray._private.authentication.authentication_token_setup import \
            maybe_enable_token_auth_if_token_available
    except ImportError:  # another Ray: nothing to do
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def free_port() -> tuple[str, int]:
    """An address of this node and a free TCP port on it (for a rendezvous store)."""
    from rollout.weights import free_tcp_port

    ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return ip, free_tcp_port()


def gpu_ids() -> list[str]:
    """The GPUs Ray assigned to the calling actor (empty on CPU)."""
    return [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
