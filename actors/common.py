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
    """``ray.get`` each ref; raise :class:`ActorCallError` naming every failed actor, or
    ``TimeoutError`` naming the ones still running after ``timeout_s``."""
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    if pending:
        idx = [i for i, r in enumerate(refs) if r in set(pending)]
        for r in pending:
            ray.cancel(r, force=False)
        raise TimeoutError(f"{what}: actor(s) {idx} did not answer within {timeout_s:.0f}s")
    results, errors = [], {}
    for i, r in enumerate(refs):
        try:
            results.append(ray.get(r))
        except Exception as e:  # noqa: BLE001 - reported per actor below
            errors[i] = e
            results.append(None)
    if errors:
        raise ActorCallError(what, errors)
    return results


def free_port() -> tuple[str, int]:
    """An address of this node and a free TCP port on it (for a rendezvous store)."""
    import socket

    ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    s = socket.socket()
    s.bind(("", 0))
    port = s.getsockname()[1]
    s.close()
    return ip, port
