"""Weight sync between the learner group and the rollout pool, behind one call: ``push(version)``.

Transports (``rollout.weight_transport``):
- ``torch_dist``: learner rank 0 broadcasts bucketed weights over a dedicated process group whose
  other ranks are the engines' workers: gloo when either side is on CPU, NCCL when both are on GPU.
- ``by_value``: rank 0's weights go through Ray's object store and each engine loads them.
An engine that is busy generating receives the weights right after its current request (Ray runs
an actor's calls in order), so samples always carry the version that produced them.
"""
from __future__ import annotations

import logging
import time

import ray

from actors.common import get_all
from actors.learner import LearnerGroup
from actors.rollout import RolloutPool
from rollout.weights import GroupSpec

log = logging.getLogger(__name__)


class WeightSync:
    def __init__(self, learners: LearnerGroup, rollouts: RolloutPool, timeout_s: float = 600.0):
        self.learners, self.rollouts, self.timeout_s = learners, rollouts, timeout_s
        rc = rollouts.cfg
        self.transport = rc.weight_transport
        self.bucket_bytes = rc.weight_bucket_mb << 20
        self.metas = None
        if self.transport == "torch_dist":
            self._init_group()

    def _init_group(self) -> None:
        rc = self.rollouts.cfg
        live = self.rollouts.live()
        host, port = ray.get(self.learners.rank0.free_port.remote(), timeout=60)
        # NCCL when learner and engines hold GPUs and none is shared (NCCL cannot put two ranks on
        # one GPU); otherwise gloo through host memory.
        mine = set(ray.get(self.learners.rank0.gpu_ids.remote(), timeout=60))
        theirs = [set(g) for g in get_all([a.gpu_ids.remote() for _, a in live], "gpu ids", 60)]
        gpu = bool(mine) and all(theirs) and not any(mine & t for t in theirs)
        tp = self.rollouts.workers_per_engine()
        spec = GroupSpec(host, port, 1 + len(live) * tp, "nccl" if gpu else "gloo",
                         timeout_s=self.timeout_s)
        wire = None if rc.dtype == "auto" else rc.dtype
        refs = [self.learners.rank0.init_sender.remote(spec, self.bucket_bytes, wire)]
        refs += [a.init_weight_group.remote(spec, 1 + k * tp) for k, (_, a) in enumerate(live)]
        self.metas = get_all(refs, "weight-sync group setup", self.timeout_s)[0]
        self._members = [i for i, _ in live]
        log.info("weight sync: %s group of %d ranks at %s:%d", spec.backend, spec.world_size, host, port)

    def push(self, version: int) -> dict[str, float]:
        """Blocks until every live engine holds the learner's current weights (``version``)."""
        t0 = time.time()
        if self.transport == "by_value":
            named, v = ray.get(self.learners.rank0.weights_by_value.remote(), timeout=self.timeout_s)
            ref = ray.put(named)
            get_all([a.load_weights.remote(ref, v) for _, a in self.rollouts.live()],
                    "weight load", self.timeout_s)
            return {"sync_s": time.time() - t0, "sync_bytes": float(sum(t.numel() * t.element_size()
                                                                        for _, t in named))}
        if [i for i, _ in self.rollouts.live()] != self._members:
            self._init_group()  # an engine died: rebuild the group with the survivors
        refs = [self.learners.rank0.send_weights.remote()]
        refs += [a.receive_weights.remote(self.metas, self.bucket_bytes, version)
                 for _, a in self.rollouts.live()]
        out = get_all(refs, "weight sync", self.timeout_s)[0]
        return {"sync_s": time.time() - t0, "sync_bytes": out["bytes"]}
