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
from typing import Iterable, Iterator, Protocol

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


_END = "__aha_end_of_stage__"


def stream_stages_to_rank0(local: Iterable[tuple[str, torch.Tensor]], stage: int, num_stages: int,
                           device: torch.device | str = "cpu", sync_bytes: int = 256 << 20
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every pipeline stage's weights, in stage order, on global rank 0; nothing on other ranks.

    Every rank of the default process group calls this with ``local``, its stage's stream (which may
    run collectives among the stage's ranks: TP / EP gathers), and iterates the result to the end.
    Rank 0 (always in stage 0) yields its own stream, then receives each later stage's tensors, one
    at a time, from that stage's lowest rank; every other rank drains its stream (taking part in the
    stage's collectives) and yields nothing. ``device`` is where received tensors land (the default
    group's device: ``cuda`` for NCCL). A sender waits for its sends every ``sync_bytes`` so it
    never holds more than that much of its stage in flight.

    With one stage this is ``local`` on rank 0 and an empty stream elsewhere.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield from local
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    stages: list = [None] * world
    dist.all_gather_object(stages, stage)
    if stages[0] != 0:
        raise RuntimeError(f"rank 0 must be in pipeline stage 0, it is in stage {stages[0]}")
    leaders = {s: min(r for r in range(world) if stages[r] == s) for s in set(stages)}
    if sorted(leaders) != list(range(num_stages)):
        raise RuntimeError(f"expected pipeline stages 0..{num_stages - 1}, ranks report {sorted(leaders)}")
    if rank == 0:
        yield from local
        for s in range(1, num_stages):
            while True:
                box = [None]
                dist.recv_object_list(box, src=leaders[s], device=device)
                if box[0] == _END:
                    break
                name, shape, dtype = box[0]
                t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                dist.recv(t, src=leaders[s])
                yield name, t
        return
    if rank != leaders[stage]:
        for _ in local:  # the stage's collectives need every member
            pass
        return
    pending = 0
    for name, t in local:
        t = t.detach().contiguous().to(device)
        dist.send_object_list([(name, list(t.shape), str(t.dtype).removeprefix("torch."))], dst=0,
                              device=device)
        dist.send(t, dst=0)
        pending += t.numel() * t.element_size()
        if pending >= sync_bytes and torch.device(device).type == "cuda":
            torch.cuda.current_stream().synchronize()
            pending = 0
    dist.send_object_list([_END], dst=0, device=device)
