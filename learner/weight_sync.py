"""Weight export from the learner: one small interface, swappable transports.

``WeightSender.send(named, version)`` pushes full Hugging Face-named weights to every rollout engine.
- :class:`TorchDistSender`: bucketed broadcast over a dedicated torch.distributed group (gloo on
  CPU, NCCL on GPU); the engines receive with ``rollout.weights.recv_buckets``.
- ``by_value``: weights travel through the caller (Ray's object store) and the engines load them;
  needs no process group, fine for small models and tests (no sender object: see actors.learner).
The Megatron backend adds vLLM's native NCCL/IPC transfer behind the same call.
"""
from __future__ import annotations

import time
from typing import Iterable, Protocol

import torch

from rollout.weights import GroupSpec, TensorMeta, make_group, metas_of, send_buckets


class WeightSender(Protocol):
    def send(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> dict[str, float]:
        """Push every weight; returns ``{"bytes": ..., "seconds": ...}``."""


class TorchDistSender:
    """Rank 0 of a weight-sync group whose other ranks are engine workers."""

    def __init__(self, spec: GroupSpec, bucket_bytes: int, wire_dtype: str | None = None):
        self.spec, self.bucket_bytes, self.wire_dtype = spec, bucket_bytes, wire_dtype
        self.pg = make_group(spec, 0)
        self.device = torch.device("cuda" if spec.backend == "nccl" else "cpu")

    def metas(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
        return metas_of(named, self.wire_dtype)

    def send(self, named: Iterable[tuple[str, torch.Tensor]], version: int) -> dict[str, float]:
        named = list(named)
        t0 = time.time()
        nbytes = send_buckets(self.pg, named, self.metas(named), self.bucket_bytes, self.device)
        return {"bytes": float(nbytes), "seconds": time.time() - t0}
