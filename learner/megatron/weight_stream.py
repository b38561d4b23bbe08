"""Stream learner weights into vLLM engines through vLLM's native weight-transfer API (no disk).

vLLM 0.26 ships weight-transfer engines selected by ``LLM(..., weight_transfer_config={"backend":
...})``; the trainer side is a static ``trainer_send_weights`` of the matching engine class:

- ``ipc``  CUDA IPC: the learner packs tensors into one reusable GPU bucket and hands its IPC
  handle to the engine, which copies out of it (learner and engine on the same GPU).
- ``nccl`` NCCL broadcast from learner rank 0 to every engine worker over a communicator made once
  by :meth:`WeightStreamSender.connect_nccl` (engines on other GPUs), packed into double-buffered
  buckets.

Both are bucketed (``bucket_bytes``), so peak extra memory is one or two buckets, not a model copy.

Engine side: :class:`rollout.weights.NativeReceiver` (re-exported here as ``EngineReceiver``) wraps a
``vllm.LLM`` and is what a rollout actor calls (``start`` -> ``update`` per bucket -> ``finish``);
:class:`LocalEngine` adapts one in this process to the sender. In a job, every rollout actor exposes
``weight_transfer(method, payload)`` and the learner's rank 0 reaches it through
``actors.rollout.RayEngineEndpoint`` (``submit`` returns the ObjectRef, ``wait`` does ``ray.get``);
this module never imports Ray itself (vLLM's ipc module does).

Example (one process, one GPU)::

    llm = vllm.LLM(model=path, weight_transfer_config={"backend": "ipc"})
    sender = WeightStreamSender("ipc", [LocalEngine(EngineReceiver(llm))])
    stats = sender.send(backend.named_hf_weights(), version=backend.version)
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from typing import Any, Iterable, Iterator, Protocol

import torch

from rollout.weights import NativeReceiver as EngineReceiver  # the engine side (re-exported)

BACKENDS = ("ipc", "nccl")
DEFAULT_BUCKET_BYTES = 512 << 20


class EngineEndpoint(Protocol):
    """How the sender reaches one engine's :class:`EngineReceiver`."""

    def submit(self, method: str, payload: dict | None = None) -> Any:
        """Start ``EngineReceiver.call(method, payload)`` on the engine; return a waitable handle."""

    def wait(self, handles: list) -> list:
        """Block until every handle from :meth:`submit` is done; return their results."""


class LocalEngine:
    """:class:`EngineEndpoint` for an :class:`EngineReceiver` in this process.

    Calls run on a worker thread, so an NCCL ``update`` can block on the broadcast while the
    sender drives it from the calling thread.
    """

    def __init__(self, receiver: EngineReceiver):
        self.receiver = receiver
        self._pool = ThreadPoolExecutor(max_workers=1)

    def submit(self, method: str, payload: dict | None = None) -> Future:
        return self._pool.submit(self.receiver.call, method, payload)

    def wait(self, handles: list) -> list:
        return [h.result() for h in handles]


def _as_dict(info) -> dict:
    return asdict(info) if is_dataclass(info) else dict(info)


class WeightStreamSender:
    """Sends named tensors (Hugging Face names, on the learner's GPU) to every engine.

    Args:
        backend: ``"ipc"`` (engines share the learner's GPU) or ``"nccl"`` (engines elsewhere).
        engines: one :class:`EngineEndpoint` per engine.
        bucket_bytes: bucket size; every tensor must fit in one bucket.
        nccl_buffers: NCCL only: buckets in flight (double buffering by default).

    Only the learner's rank 0 holds a sender; it sends the backend's ``export_hf_weights()``
    stream while the other ranks iterate theirs (their part of the gathers). IPC with several
    learner ranks is not supported here (vLLM would all-gather every rank's handles, which needs
    the full model on every rank): the job checks that an IPC learner is one process.
    """

    def __init__(self, backend: str, engines: list[EngineEndpoint],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, nccl_buffers: int = 2):
        if backend not in BACKENDS:
            raise ValueError(f"weight stream backend must be one of {', '.join(BACKENDS)}, "
                             f"got {backend!r}")
        if not engines:
            raise ValueError("WeightStreamSender needs at least one engine")
        if bucket_bytes < 1 << 20:
            raise ValueError(f"bucket_bytes must be >= 1 MiB, got {bucket_bytes}")
        self.backend, self.engines = backend, list(engines)
        self.bucket_bytes, self.nccl_buffers = bucket_bytes, nccl_buffers
        self._group = None
        self._meta: list[tuple[str, list[int], str]] | None = None

    # ------------------------------------------------------------------ NCCL setup
    def connect_nccl(self, master_address: str, master_port: int,
                     engine_world_sizes: list[int]) -> None:
        """Make the NCCL communicator: learner rank 0 is rank 0, engine ``i``'s workers follow.

        Call on learner rank 0 only (other ranks never send). ``engine_world_sizes[i]`` is engine
        ``i``'s number of GPU workers (TP * PP).
        """
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
        if self.backend != "nccl":
            raise ValueError("connect_nccl is for backend='nccl'")
        world = 1 + sum(engine_world_sizes)
        handles, offset = [], 1
        for eng, n in zip(self.engines, engine_world_sizes):
            info = {"master_address": master_address, "master_port": master_port,
                    "rank_offset": offset, "world_size": world}
            handles.append((eng, eng.submit("init", {"init_info": info})))
            offset += n
        self._group = NCCLWeightTransferEngine.trainer_init(
            {"master_address": master_address, "master_port": master_port, "world_size": world})
        for eng, h in handles:
            eng.wait([h])

    def learn_layout(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Record names, shapes and dtypes of a stream without keeping its tensors (NCCL engines
        must know them before a broadcast starts). Without it the first NCCL send holds the whole
        stream once to learn them. Returns the number of tensors."""
        self._meta = [(n, list(t.shape), str(t.dtype).split(".")[-1]) for n, t in named_tensors]
        return len(self._meta)

    # ------------------------------------------------------------------ send
    def _fan_out(self, method: str, payload: dict | None = None) -> list:
        handles = [(e, e.submit(method, payload)) for e in self.engines]
        return [e.wait([h])[0] for e, h in handles]

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> dict[str, float]:
        """Stream ``named_tensors`` into every engine and make them serve ``version``.

        Returns ``{"bytes", "seconds", "gb_per_s", "tensors"}`` (the first two are those of
        :class:`learner.weight_sync.WeightSender`).
        """
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        counter = {"bytes": 0, "n": 0}

        def counted(it) -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in it:
                counter["bytes"] += t.numel() * t.element_size()
                counter["n"] += 1
                yield name, t

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if rank0:
            self._fan_out("start", {"version": version})
        if self.backend == "ipc":
            self._send_ipc(counted(named_tensors), rank0)
        else:
            self._send_nccl(named_tensors, counter, rank0)
        if rank0:
            self._fan_out("finish", {"version": version})
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        gb = counter["bytes"] / 1e9
        return {"bytes": float(counter["bytes"]), "seconds": dt,
                "gb_per_s": gb / dt if dt > 0 else 0.0, "tensors": float(counter["n"])}

    def _send_ipc(self, it, rank0: bool) -> None:
        from vllm.distributed.weight_transfer.ipc_engine import (
            IPCTrainerSendWeightsArgs, IPCWeightTransferEngine)

        def deliver(info) -> None:  # runs on rank 0; each engine copies the bucket out before return
            self._fan_out("update", {"update_info": _as_dict(info)})

        IPCWeightTransferEngine.trainer_send_weights(
            it, IPCTrainerSendWeightsArgs(send_mode=deliver, packed=True,
                                          packed_buffer_size_bytes=self.bucket_bytes))

    def _send_nccl(self, named_tensors, counter: dict, rank0: bool) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine)
        if not rank0:  # other learner ranks only take part in the learner's own gathers
            for _ in named_tensors:
                pass
            return
        if self._group is None:
            raise RuntimeError("call connect_nccl(...) before the first NCCL send")
        # The engines must know names/shapes/dtypes before the broadcast starts: the first send
        # materialises the stream once to learn them (later sends stream directly).
        items = None
        if self._meta is None:
            items = [(n, t) for n, t in named_tensors]
            self._meta = [(n, list(t.shape), str(t.dtype).split(".")[-1]) for n, t in items]
        names, shapes, dtypes = (list(x) for x in zip(*self._meta))
        info = {"names": names, "dtype_names": dtypes, "shapes": shapes, "packed": True,
                "packed_buffer_size_bytes": self.bucket_bytes,
                "packed_num_buffers": self.nccl_buffers}
        handles = [(e, e.submit("update", {"update_info": info})) for e in self.engines]

        def checked(it):
            i = -1
            for i, (n, t) in enumerate(it):
                if i >= len(names) or n != names[i]:
                    raise RuntimeError(f"weight stream changed: tensor {i} is {n!r}, engines "
                                       f"expect {names[i] if i < len(names) else 'nothing'!r}")
                counter["bytes"] += t.numel() * t.element_size()
                counter["n"] += 1
                yield n, t
            if i + 1 != len(names):  # the engines would wait for the missing tensors forever
                raise RuntimeError(f"weight stream ended after {i + 1} tensors, engines expect "
                                   f"{len(names)} (next: {names[i + 1]!r})")

        NCCLWeightTransferEngine.trainer_send_weights(
            checked(iter(items) if items is not None else named_tensors),
            NCCLTrainerSendWeightsArgs(group=self._group, packed=True,
                                       packed_buffer_size_bytes=self.bucket_bytes,
                                       packed_num_buffers=self.nccl_buffers))
        for e, h in handles:
            e.wait([h])
