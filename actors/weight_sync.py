"""Weight sync between the learner group and the rollout pool, behind one call: ``push(version)``.

Transports (``rollout.weight_transport``):
- ``torch_dist``: learner rank 0 broadcasts bucketed weights over a dedicated process group whose
  other ranks are the engines' workers: gloo when either side is on CPU, NCCL when both are on GPU.
- ``by_value``: rank 0's weights go through Ray's object store and each engine loads them.
- ``vllm_ipc`` / ``vllm_nccl`` (GPU): vLLM's own weight-transfer engines, driven by learner rank 0
  (``learner.megatron.weight_stream``): CUDA IPC buckets when the engines share the learner's GPU,
  an NCCL broadcast when they hold other GPUs. The placement is checked when the sync is set up.
Every learner rank takes part in each push (a model-parallel learner gathers its shards with
collectives; ``LearnerBackend.export_hf_weights``); rank 0 alone sends.
An engine that is busy generating receives the weights right after its current request (Ray runs
an actor's calls in order), so samples always carry the version that produced them; the controller
submits no generation while a push is in flight.
"""
from __future__ import annotations

import logging
import time

import ray

from actors.common import get_all
from actors.learner import LearnerGroup
from actors.rollout import RayEngineEndpoint, RolloutPool
from rollout.weights import GroupSpec

log = logging.getLogger(__name__)


def check_placement(transport: str, learner_gpus: set, engine_gpus: list[set], learner_ranks: int
                    ) -> str | None:
    """Why ``transport`` cannot serve this placement (``None`` when it can).

    ``learner_gpus``: GPU ids of learner rank 0; ``engine_gpus``: each live engine's GPU ids.
    """
    if transport == "vllm_ipc":
        if learner_ranks != 1:
            return f"vllm_ipc streams from one learner process, the learner has {learner_ranks}"
        if not learner_gpus:
            return "vllm_ipc needs the learner on a GPU"
        for i, g in enumerate(engine_gpus):
            if not g or not g <= learner_gpus:
                return (f"vllm_ipc needs every engine on the learner's GPU {sorted(learner_gpus)}; "
                        f"engine {i} holds {sorted(g)} (use rollout.weight_transport=vllm_nccl)")
    if transport == "vllm_nccl":
        if not learner_gpus or not all(engine_gpus):
            return "vllm_nccl needs the learner and every engine on GPUs"
        for i, g in enumerate(engine_gpus):
            if g & learner_gpus:
                return (f"vllm_nccl cannot put two ranks on one GPU: engine {i} shares GPU "
                        f"{sorted(g & learner_gpus)} with the learner (use rollout.weight_transport="
                        "vllm_ipc, or give the engines their own GPUs)")
    return None


class WeightSync:
    def __init__(self, learners: LearnerGroup, rollouts: RolloutPool, timeout_s: float = 600.0):
        self.learners, self.rollouts, self.timeout_s = learners, rollouts, timeout_s
        rc = rollouts.cfg
        self.transport = rc.weight_transport
        self.bucket_bytes = rc.weight_bucket_mb << 20
        self.metas = None
        self._members: list[int] = []
        if self.transport == "torch_dist":
            self._init_group()
        elif self.transport.startswith("vllm_"):
            self._init_native()

    def _gpus(self) -> tuple[set, list[set]]:
        mine = set(ray.get(self.learners.rank0.gpu_ids.remote(), timeout=60))
        theirs = [set(g) for g in get_all([a.gpu_ids.remote() for _, a in self.rollouts.live()],
                                          "gpu ids", 60)]
        return mine, theirs

    def _init_group(self) -> None:
        rc = self.rollouts.cfg
        live = self.rollouts.live()
        host, port = ray.get(self.learners.rank0.free_port.remote(), timeout=60)
        # NCCL wherever vLLM's NCCL transfer could run too (learner and engines on GPUs, none
        # shared: NCCL cannot put two ranks on one GPU); otherwise gloo through host memory.
        mine, theirs = self._gpus()
        gpu = check_placement("vllm_nccl", mine, theirs, len(self.learners.actors)) is None
        tp = self.rollouts.workers_per_engine()
        spec = GroupSpec(host, port, 1 + len(live) * tp, "nccl" if gpu else "gloo",
                         timeout_s=self.timeout_s)
        wire = None if rc.dtype == "auto" else rc.dtype
        refs = [a.init_sender.remote(spec, self.bucket_bytes, wire) for a in self.learners.actors]
        refs += [a.init_weight_group.remote(spec, 1 + k * tp) for k, (_, a) in enumerate(live)]
        self.metas = get_all(refs, "weight-sync group setup", self.timeout_s)[0]
        self._members = [i for i, _ in live]
        log.info("weight sync: %s group of %d ranks at %s:%d", spec.backend, spec.world_size, host, port)

    def _init_native(self) -> None:
        live = self.rollouts.live()
        mine, theirs = self._gpus()
        why = check_placement(self.transport, mine, theirs, len(self.learners.actors))
        if why:
            raise RuntimeError(f"rollout.weight_transport={self.transport}: {why}")
        backend = self.transport.removeprefix("vllm_")
        endpoints = [RayEngineEndpoint(i, a, self.timeout_s) for i, a in live]
        nccl = None
        if backend == "nccl":
            host, port = ray.get(self.learners.rank0.free_port.remote(), timeout=60)
            nccl = (host, port, [self.rollouts.workers_per_engine()] * len(live))
        get_all([a.init_native_sender.remote(backend, endpoints, self.bucket_bytes, nccl)
                 for a in self.learners.actors], "vLLM weight-transfer setup", self.timeout_s)
        self._members = [i for i, _ in live]
        log.info("weight sync: vLLM %s transfer to %d engine(s)", backend, len(live))

    def push(self, version: int) -> dict[str, float]:
        """Blocks until every live engine holds the learner's current weights (``version``)."""
        t0 = time.time()
        if self.transport == "by_value":
            outs = get_all([a.weights_by_value.remote() for a in self.learners.actors],
                           "weight export", self.timeout_s)
            named, _ = outs[0]
            ref = ray.put(named)
            get_all([a.load_weights.remote(ref, version) for _, a in self.rollouts.live()],
                    "weight load", self.timeout_s)
            return {"sync_s": time.time() - t0, "sync_bytes": float(sum(t.numel() * t.element_size()
                                                                        for _, t in named))}
        if [i for i, _ in self.rollouts.live()] != self._members:
            # an engine died: rebuild the group / sender with the survivors
            self._init_group() if self.transport == "torch_dist" else self._init_native()
        refs = [a.send_weights.remote() for a in self.learners.actors]
        if self.transport == "torch_dist":
            refs += [a.receive_weights.remote(self.metas, self.bucket_bytes, version)
                     for _, a in self.rollouts.live()]
        out = get_all(refs, "weight sync", self.timeout_s)[0]
        return {"sync_s": time.time() - t0, "sync_bytes": out["bytes"]}
