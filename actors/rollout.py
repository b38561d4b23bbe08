"""Rollout actors: one vLLM engine each (``rollout.engine.VllmEngine``), and the pool around them."""
from __future__ import annotations

import logging
import os

import ray

from actors.common import get_all, gpu_ids
from rollout.datasets import PromptRecord
from rollout.engine import RolloutConfig, VllmEngine
from rollout.types import to_arrow
from rollout.weights import GroupSpec, TensorMeta

log = logging.getLogger(__name__)


@ray.remote
class RolloutActor:
    """Thin Ray wrapper: every method forwards to the engine. Results travel as Arrow batches."""

    def __init__(self, model_path: str, cfg: RolloutConfig, index: int):
        logging.basicConfig(level=logging.INFO)
        self.engine = VllmEngine(model_path, cfg, index)
        self.index = index

    def ready(self) -> dict:
        return {"index": self.index, "start_s": self.engine.start_s}

    def generate(self, records: list[PromptRecord], n: int | None = None,
                 temperature: float | None = None, top_p: float | None = None) -> dict:
        samples, stats = self.engine.generate(records, n, temperature, top_p)
        return {"batch": to_arrow(samples), "stats": stats}

    def init_weight_group(self, spec: GroupSpec, rank_offset: int) -> list[int]:
        return self.engine.init_weight_group(spec, rank_offset)

    def receive_weights(self, metas: list[TensorMeta], bucket_bytes: int, version: int) -> int:
        return self.engine.receive_weights(metas, bucket_bytes, version)

    def load_weights(self, named: list, version: int) -> int:
        return self.engine.load_weights(named, version)

    def weight_transfer(self, method: str, payload: dict | None = None):
        return self.engine.weight_transfer(method, payload)

    def gpu_ids(self) -> list[str]:
        return gpu_ids()

    def shutdown(self) -> None:
        self.engine.shutdown()


class RayEngineEndpoint:
    """How the learner's weight sender reaches one rollout actor's vLLM-native receiver
    (``learner.megatron.weight_stream.EngineEndpoint``): ``submit`` returns an ObjectRef, ``wait``
    gets the results, failing with the engine's index after ``timeout_s``."""

    def __init__(self, index: int, actor, timeout_s: float = 600.0):
        self.index, self.actor, self.timeout_s = index, actor, timeout_s

    def submit(self, method: str, payload: dict | None = None):
        return self.actor.weight_transfer.remote(method, payload)

    def wait(self, handles: list) -> list:
        return get_all(handles, f"weight transfer to engine {self.index}", self.timeout_s)


class RolloutPool:
    """``cfg.num_actors`` engines; scale by changing that number (each engine is independent)."""

    def __init__(self, model_path: str, cfg: RolloutConfig, num_cpus: float = 1.0, wait: bool = True):
        """Starts the engines; ``wait=False`` returns at once (call :meth:`wait_ready` before use),
        so a caller can start the learner while the engines load."""
        self.cfg = cfg
        env = {}
        if cfg.weight_transport == "vllm_ipc":
            # CUDA IPC handles carry torch types, which vLLM's engine-core messages only pass with
            # its pickle fallback (traffic between the engine's own local processes)
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        opts = {"num_cpus": num_cpus, "num_gpus": cfg.gpus_per_actor,
                "runtime_env": {"env_vars": {**env, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                                             "VLLM_USE_FLASHINFER_SAMPLER": "0",
                                             "HF_HUB_OFFLINE": "1",
                                             # keep the terminal to progress + one line per step
                                             "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL",
                                                                                  "WARNING")}}}
        self.actors = [RolloutActor.options(name=None, **opts).remote(model_path, cfg, i)
                       for i in range(cfg.num_actors)]
        self._ready = [a.ready.remote() for a in self.actors]
        self.start_s = 0.0
        self.alive = set(range(len(self.actors)))
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every engine has started (``rollout.start_timeout_s`` at most). Idempotent."""
        if self._ready is None:
            return
        info = get_all(self._ready, "rollout engine start", self.cfg.start_timeout_s)
        self._ready = None
        self.start_s = max(i["start_s"] for i in info)
        log.info("rollout pool: %d engine(s) up (slowest start %.1fs)", len(self.actors), self.start_s)

    def mark_dead(self, index: int, why: str) -> None:
        if index in self.alive:
            self.alive.discard(index)
            log.error("rollout engine %d removed from the pool: %s", index, why)
        if not self.alive:
            raise RuntimeError(f"every rollout engine is dead (last: engine {index}: {why})")

    def kill(self, index: int, why: str) -> None:
        """Stop a hung engine (its requests are counted by the caller) and remove it."""
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.mark_dead(index, why)

    def live(self) -> list[tuple[int, "ray.actor.ActorHandle"]]:
        return [(i, self.actors[i]) for i in sorted(self.alive)]

    def workers_per_engine(self) -> int:
        return self.cfg.tensor_parallel

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - teardown: the kill below still happens
                pass
            ray.kill(a)
