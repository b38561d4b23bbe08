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
submits no generation while a push is in flight. A one-process CPU engine finishes reloading the
weights it received after the push has returned (``VllmEngine.receive_weights``), before its next
call runs.
"""
from __future__ import annotations

import logging
import time

import ray

from actors.common import ActorCallError, get_all
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
    """``push(version)`` gives every serving engine, and every engine that has just started
    (:meth:`RolloutPool.joiners`), the learner's current weights; the newcomers serve from then on.
    A pool whose membership changed since the last push (scaled, or an engine died) gets a new
    group first: a communicator's membership is fixed when it is made. An engine that dies during
    a push is removed (and replaced, :meth:`RolloutPool.mark_dead`) and the push is redone for the
    others; nothing waits on it past ``rollout.sync_timeout_s``."""

    def __init__(self, learners: LearnerGroup, rollouts: RolloutPool, timeout_s: float = 600.0):
        self.learners, self.rollouts = learners, rollouts
        rc = rollouts.cfg
        self.timeout_s = min(timeout_s, rc.sync_timeout_s)
        self.transport = rc.weight_transport
        self.bucket_bytes = rc.weight_bucket_mb << 20
        self.metas = None
        self.version = 0  # what the serving engines hold
        self._members: list[int] = []
        self.counts = {"group_rebuilds": 0, "retries": 0}
        if self.transport == "torch_dist":
            self._init_group(self._live())
        elif self.transport.startswith("vllm_"):
            self._init_native(self._live())

    def _live(self, extra: list[int] = ()) -> list[tuple[int, "ray.actor.ActorHandle"]]:
        ids = sorted({i for i, _ in self.rollouts.live()} | set(extra))
        return [(i, self.rollouts.actors[i]) for i in ids]

    def _gpus(self, live) -> tuple[set, list[set]]:
        mine = set(ray.get(self.learners.rank0.gpu_ids.remote(), timeout=60))
        theirs = [set(g) for g in get_all([a.gpu_ids.remote() for _, a in live], "gpu ids", 60)]
        return mine, theirs

    def _init_group(self, live) -> None:
        rc = self.rollouts.cfg
        host, port = ray.get(self.learners.rank0.free_port.remote(), timeout=60)
        # NCCL wherever vLLM's NCCL transfer could run too (learner and engines on GPUs, none
        # shared: NCCL cannot put two ranks on one GPU); otherwise gloo through host memory.
        mine, theirs = self._gpus(live)
        gpu = check_placement("vllm_nccl", mine, theirs, len(self.learners.actors)) is None
        tp = self.rollouts.workers_per_engine()
        spec = GroupSpec(host, port, 1 + len(live) * tp, "nccl" if gpu else "gloo",
                         timeout_s=self.timeout_s)
        # the engines' dtype on the wire (half the bytes of float32 weights for a bf16 engine)
        wire = self.rollouts.dtype if rc.dtype == "auto" else rc.dtype
        refs = [a.init_sender.remote(spec, self.bucket_bytes, wire) for a in self.learners.actors]
        refs += [a.init_weight_group.remote(spec, 1 + k * tp) for k, (_, a) in enumerate(live)]
        self.metas = self._get(refs, live, "weight-sync group setup")[0]
        self._members = [i for i, _ in live]
        log.info("weight sync: %s group of %d ranks at %s:%d (engines %s)", spec.backend,
                 spec.world_size, host, port, self._members)

    def _init_native(self, live) -> None:
        mine, theirs = self._gpus(live)
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

    def _get(self, refs: list, live, what: str) -> list:
        """``get_all`` over the learners' refs then one ref per engine of ``live``. When an engine
        died (or hung) the learner's side fails too (its peer closed the connection): once every
        call settled, that is raised as :class:`EngineLost`; any other failure as it is."""
        n = len(self.learners.actors)
        try:
            return get_all(refs, what, self.timeout_s)
        except (ActorCallError, TimeoutError) as e:
            lost = {}
            if isinstance(e, TimeoutError):  # hung engines: stop them, so their peers fail too
                _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
                idx = {r: k for k, r in enumerate(refs)}
                lost = {live[idx[r] - n][0]: e for r in pending if idx[r] >= n}
                for i in lost:
                    self.rollouts.terminate(i)
            # the survivors' calls fail (or finish) once the group's timeout passes at the latest,
            # and so do the receives a CPU engine runs in the background after its call returned
            # (VllmEngine.receive_weights): a new group can only be made once they are over
            settling = [a.settle_weights.remote() for i, a in live if i not in lost]
            ray.wait(refs + settling, num_returns=len(refs) + len(settling), timeout=self.timeout_s + 30)
            # a failed call does not say whose fault it was: ask each engine whether it is still there
            probes = {i: a.ready.remote() for i, a in live if i not in lost}
            for i, ref in probes.items():
                try:
                    ray.get(ref, timeout=30)
                except ray.exceptions.RayActorError as err:
                    lost[i] = err
                except Exception as err:  # noqa: BLE001 - no answer within 30 s: hung, stop it
                    self.rollouts.terminate(i)
                    lost[i] = err
            if not lost:
                raise
            raise EngineLost(lost) from e

    def push(self, version: int, wait_for_new: bool = False) -> dict[str, float]:
        """Blocks until every serving engine, and every newly started one, holds ``version``
        (``wait_for_new``, or no engine left serving: also wait for engines still starting).
        "Holds": whatever the engine runs next runs on it. A one-process CPU engine may still be
        reloading the received weights in the background when this returns; its next call waits
        for that (``VllmEngine.receive_weights``), so the learner's next step need not."""
        t0 = time.time()
        stats: dict[str, float] = {}
        for attempt in range(1 + self.rollouts.cfg.max_replacements + 2):
            # none serving (the only engine died): wait for its replacement, within its start timeout
            new = self.rollouts.joiners(wait=wait_for_new or not self.rollouts.alive)
            live = self._live(new)
            if not live:
                raise RuntimeError("weight sync: no rollout engine is left to send weights to")
            try:
                stats = self._push(version, live)
            except EngineLost as e:
                self.counts["retries"] += 1
                for i, err in e.lost.items():
                    if i in new:
                        new.remove(i)
                        self.rollouts.counts["start_failed"] += 1
                        log.error("rollout engine %d died before it served: %s", i, err)
                    else:
                        self.rollouts.mark_dead(i, f"died during weight sync: {type(err).__name__}")
                self._members = []  # rebuild with the survivors
                continue
            self.rollouts.join(new)
            break
        else:
            raise RuntimeError("weight sync: engines kept dying during the sync; stopping")
        self.version = version
        stats["sync_s"] = time.time() - t0
        stats.update({f"sync_{k}": float(v) for k, v in self.counts.items()})
        return stats

    def admit(self) -> bool:
        """Serve the engines that have started (or wait for those starting when none serves),
        at the version the serving ones hold; returns whether any joined."""
        if not self.rollouts.starting:
            return False
        before = len(self.rollouts.alive)
        self.push(self.version, wait_for_new=not self.rollouts.alive)
        return len(self.rollouts.alive) > before

    def _push(self, version: int, live) -> dict[str, float]:
        if self.transport == "by_value":
            outs = get_all([a.weights_by_value.remote() for a in self.learners.actors],
                           "weight export", self.timeout_s)
            named, _ = outs[0]
            ref = ray.put(named)
            self._get([a.load_weights.remote(ref, version) for _, a in live], live, "weight load")
            return {"sync_bytes": float(sum(t.numel() * t.element_size() for _, t in named))}
        if [i for i, _ in live] != self._members:
            self.counts["group_rebuilds"] += 1
            self._init_group(live) if self.transport == "torch_dist" else self._init_native(live)
        refs = [a.send_weights.remote() for a in self.learners.actors]
        if self.transport == "torch_dist":
            refs += [a.receive_weights.remote(self.metas, self.bucket_bytes, version) for _, a in live]
        out = self._get(refs, live, "weight sync")[0]
        return {"sync_bytes": out["bytes"]}


class EngineLost(Exception):
    def __init__(self, lost: dict):
        self.lost = lost
        super().__init__(f"rollout engine(s) {sorted(lost)} lost during the weight sync")
