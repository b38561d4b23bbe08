"""Reference actors (``learner.reference: pool``): the frozen KL reference in processes of its own,
beside the rollout engines and the reward actors, the way OpenRLHF runs its reference models apart
from the actor being trained.

The rollout stream hands each training request's generation (its ObjectRef) to a reward actor and
to a reference actor at once: the reference's logprobs are computed while the batch is scored and
while the learner still trains on the previous batch, so the learner's update never waits for a
reference forward, and the engine is free for the next weight sync as soon as it has generated.
"""
from __future__ import annotations

import itertools
import logging

import ray

from actors.common import get_all
from learner.reference import Reference, ReferenceSpec

log = logging.getLogger(__name__)


@ray.remote(max_restarts=3)  # Ray restarts a dead one; its call in flight fails and is counted
class ReferenceActor:
    def __init__(self, model_path: str, spec: ReferenceSpec, index: int):
        logging.basicConfig(level=logging.INFO)
        import torch
        torch.set_num_threads(1)  # beside the engines and the learner: one core's share
        self.index = index
        self.reference = Reference(model_path, spec)

    def ready(self) -> dict:
        return {"index": self.index, "dtype": str(self.reference.dtype)}

    def logprobs(self, generated: dict) -> dict:
        """The reference's logprobs of each sample of a rollout actor's ``generate`` result (pass
        its ObjectRef: Ray hands the result over once it is done): ``{"ref_logprobs": [[...]],
        "keys": [(prompt_id, group_index), ...], "time_ref_s": s}``."""
        cols = generated["batch"].select(["prompt_id", "group_index", "prompt_ids", "response_ids"])
        cols = cols.to_pydict()
        lps, secs = self.reference.sample_logprobs(cols["prompt_ids"], cols["response_ids"])
        return {"ref_logprobs": lps, "keys": list(zip(cols["prompt_id"], cols["group_index"])),
                "time_ref_s": secs}


class ReferencePool:
    """``n`` reference actors, used round-robin; ``wait=False`` returns while they start (beside
    the engines and the learner)."""

    def __init__(self, model_path: str, spec: ReferenceSpec, n: int = 1, num_cpus: float = 0.5,
                 resources: dict | None = None, start_timeout_s: float = 300.0, wait: bool = True):
        if n < 1:
            raise ValueError(f"learner.reference_actors must be >= 1, got {n}")
        self.spec, self.timeout_s = spec, start_timeout_s
        self.actors = [ReferenceActor.options(num_cpus=num_cpus, resources=dict(resources or {}))
                       .remote(model_path, spec, i) for i in range(n)]
        self._starting = [a.ready.remote() for a in self.actors]
        self._rr = itertools.cycle(range(n))
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        if self._starting:
            starting, self._starting = self._starting, None
            info = get_all(starting, "reference actor start", self.timeout_s)
            log.info("reference pool: %d actor(s) up (%s)", len(info), info[0]["dtype"])

    def submit(self, generated_ref) -> "ray.ObjectRef":
        """The reference logprobs of a pending generation, computed once it is done (returns at
        once; on an actor still starting, Ray queues the call, so the first generations overlap
        the reference's start: the stage awaits :meth:`wait_ready` after its first requests)."""
        return self.actors[next(self._rr)].logprobs.remote(generated_ref)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
