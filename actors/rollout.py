"""Rollout actors: one vLLM engine each (``rollout.engine.VllmEngine``), and the pool around them."""
from __future__ import annotations

import logging
import os
import uuid

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
        return {"index": self.index, "start_s": self.engine.start_s, "dtype": self.engine.dtype}

    def generate(self, records: list[PromptRecord], n: int | None = None,
                 temperature: float | None = None, top_p: float | None = None) -> dict:
        samples, stats = self.engine.generate(records, n, temperature, top_p)
        return {"batch": to_arrow(samples), "stats": stats}

    @ray.method(num_returns=2)
    def generate_for_stream(self, records: list[PromptRecord]) -> tuple[dict, int]:
        """:meth:`generate`, and a second, tiny object: the number of samples. The rollout stream
        waits on that one to free the engine, so the driver never pulls a generation it only
        hands on to the reward and reference actors."""
        out = self.generate(records)
        return out, out["batch"].num_rows

    def init_weight_group(self, spec: GroupSpec, rank_offset: int) -> list[int]:
        return self.engine.init_weight_group(spec, rank_offset)

    def receive_weights(self, metas: list[TensorMeta], bucket_bytes: int, version: int) -> int:
        return self.engine.receive_weights(metas, bucket_bytes, version)

    def load_weights(self, named: list, version: int) -> int:
        return self.engine.load_weights(named, version)

    def settle_weights(self) -> bool:
        """Wait until no weight receive runs in the background (``VllmEngine.receive_weights``);
        returns whether the engine holds a complete set of weights."""
        self.engine.settle(repairing=True)
        return self.engine.weights_complete

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
    """The rollout engines. Each engine is independent, so the pool can change size while a job
    runs: :meth:`add` starts engines (they serve only after the weight sync has given them the
    current weights: :meth:`joiners` / :meth:`join`), :meth:`retire` takes one out of service (the
    stream stops it once its request in flight is done), and a dead engine is replaced while
    ``rollout.max_replacements`` allows. Indices are never reused, so logs and counters name one
    engine each.

    Serving engines (``alive``, what :meth:`live` returns) all hold the weight version of the last
    sync; only they take requests."""

    def __init__(self, model_path: str, cfg: RolloutConfig, num_cpus: float = 1.0, wait: bool = True,
                 resources: dict | None = None):
        """Starts the engines; ``wait=False`` returns at once (call :meth:`wait_ready` before use),
        so a caller can start the learner while the engines load."""
        self.cfg, self.model_path = cfg, model_path
        env = {}
        if cfg.weight_transport == "vllm_ipc":
            # CUDA IPC handles carry torch types, which vLLM's engine-core messages only pass with
            # its pickle fallback (traffic between the engine's own local processes)
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        self._opts = {"num_cpus": num_cpus, "num_gpus": cfg.gpus_per_actor, "resources": dict(resources or {}),
                      "runtime_env": {"env_vars": {**env, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                                                   "VLLM_USE_FLASHINFER_SAMPLER": "0",
                                                   "HF_HUB_OFFLINE": "1",
                                                   # keep the terminal to progress + one line per step
                                                   "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL",
                                                                                        "WARNING"),
                                                   **({"AHA_DEBUG_SLOW": os.environ["AHA_DEBUG_SLOW"]}
                                                      if "AHA_DEBUG_SLOW" in os.environ else {})}}}
        self._uid = uuid.uuid4().hex[:6]  # names engines in the dashboard: aha-rollout-<uid>-<index>
        self.actors: list = []
        self.starting: dict[int, tuple["ray.ObjectRef", float]] = {}  # index -> (ready ref, t0)
        self.alive: set[int] = set()
        self.retiring: set[int] = set()
        self.counts = {"started": 0, "replaced": 0, "start_failed": 0, "retired": 0, "died": 0}
        self.start_s = 0.0
        self.dtype: str | None = None  # the engines' dtype (rollout.dtype, "auto" resolved)
        self.ready_s: dict[int, float] = {}  # per engine: seconds from start to ready
        first = self.add(cfg.num_actors, why="")
        self._initial = first
        if wait:
            self.wait_ready()

    # ---- membership ---------------------------------------------------------------------------
    def add(self, n: int, why: str = "scaled up") -> list[int]:
        """Start ``n`` engines (returns at once); they join at the next weight sync."""
        import time

        new = []
        for _ in range(n):
            i = len(self.actors)
            self.actors.append(RolloutActor.options(name=f"aha-rollout-{self._uid}-{i}", **self._opts)
                               .remote(self.model_path, self.cfg, i))
            self.starting[i] = (self.actors[i].ready.remote(), time.monotonic())
            self.counts["started"] += 1
            new.append(i)
        if why and new:
            log.info("rollout pool: starting engine(s) %s (%s)", new, why)
        return new

    def wait_ready(self) -> None:
        """Block until the first engines have started (``rollout.start_timeout_s`` at most) and put
        them in service: they hold the checkpoint every engine starts from (weight version 0).
        Idempotent."""
        if self._initial is None:
            return
        refs = [self.starting[i][0] for i in self._initial]
        info = get_all(refs, "rollout engine start", self.cfg.start_timeout_s)
        for i, x in zip(self._initial, info):
            del self.starting[i]
            self.ready_s[i] = x["start_s"]
        self.alive |= set(self._initial)
        self._initial = None
        self.start_s = max(x["start_s"] for x in info)
        self.dtype = info[0].get("dtype")
        log.info("rollout pool: %d engine(s) up (slowest start %.1fs)", len(self.alive), self.start_s)

    def joiners(self, wait: bool = False) -> list[int]:
        """Engines that finished starting and wait for weights (``wait``: block for every engine
        still starting, within ``rollout.start_timeout_s``). A start that failed is logged, counted
        (``start_failed``) and dropped."""
        import time

        out = []
        for i, (ref, t0) in list(self.starting.items()):
            left = self.cfg.start_timeout_s - (time.monotonic() - t0)
            done, _ = ray.wait([ref], timeout=max(0.0, left) if wait else 0)
            if not done and not wait and left > 0:
                continue
            del self.starting[i]
            try:
                if not done:
                    raise TimeoutError(f"not up after rollout.start_timeout_s={self.cfg.start_timeout_s:.0f}s")
                self.ready_s[i] = ray.get(ref)["start_s"]
                out.append(i)
            except Exception as e:  # noqa: BLE001 - counted and logged; the pool goes on without it
                self.counts["start_failed"] += 1
                log.error("rollout engine %d failed to start: %s: %s", i, type(e).__name__, str(e)[:2000])
                self.terminate(i)
        return out

    def join(self, indices: list[int]) -> None:
        """Put engines in service (the weight sync has just given them the current weights)."""
        self.alive |= set(indices)
        if indices:
            log.info("rollout pool: engine(s) %s serving; %s", indices, self.sizes())

    def retire(self, index: int) -> None:
        """Take a serving engine out of service (scale down); :meth:`stop` it once it is idle."""
        self.alive.discard(index)
        self.retiring.add(index)

    def stop(self, index: int) -> None:
        self.retiring.discard(index)
        self.counts["retired"] += 1
        try:
            ray.get(self.actors[index].shutdown.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - stopping it anyway
            pass
        self.terminate(index)
        log.info("rollout pool: engine %d stopped; %s", index, self.sizes())

    def scale_to(self, n: int) -> dict:
        """Grow by starting engines, or shrink by retiring the newest serving ones (engines still
        starting are stopped first). Returns what changed."""
        have = len(self.alive) + len(self.starting)
        if n < 1:
            raise ValueError(f"rollout pool size must be >= 1, got {n}")
        if n > have:
            return {"started": self.add(n - have)}
        stopped, retired = [], []
        for i in sorted(self.starting, reverse=True)[:have - n]:
            del self.starting[i]
            self.terminate(i)
            stopped.append(i)
        for i in sorted(self.alive, reverse=True)[:have - n - len(stopped)]:
            self.retire(i)
            retired.append(i)
        return {"cancelled_starts": stopped, "retiring": retired}

    def mark_dead(self, index: int, why: str) -> None:
        """Remove a dead (or hopeless) engine; start a replacement while ``rollout.max_replacements``
        allows. Raises when nothing is left that could serve."""
        if index in self.alive or index in self.retiring:
            was_serving = index in self.alive
            self.alive.discard(index)
            self.retiring.discard(index)
            self.counts["died"] += 1
            log.error("rollout engine %d removed from the pool: %s", index, why)
            if was_serving and self.counts["replaced"] < self.cfg.max_replacements:
                self.counts["replaced"] += 1
                self.add(1, why=f"replacing engine {index} ({self.counts['replaced']} of "
                                f"rollout.max_replacements={self.cfg.max_replacements})")
            elif was_serving:
                log.error("rollout pool shrinks to %d engine(s): rollout.max_replacements=%d used up",
                          len(self.alive), self.cfg.max_replacements)
        if not self.alive and not self.starting:
            raise RuntimeError(f"every rollout engine is dead (last: engine {index}: {why})")

    def terminate(self, index: int) -> None:
        """End engine ``index``'s process now, leaving its membership as it is: the caller (a hung
        sync, a failed start, a scale-down) accounts for it, e.g. with :meth:`mark_dead`."""
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def kill(self, index: int, why: str) -> None:
        """Stop a hung engine (its requests are counted by the caller) and remove it."""
        self.terminate(index)
        self.mark_dead(index, why)

    def live(self) -> list[tuple[int, "ray.actor.ActorHandle"]]:
        return [(i, self.actors[i]) for i in sorted(self.alive)]

    def sizes(self) -> dict[str, int]:
        return {"serving": len(self.alive), "starting": len(self.starting), "retiring": len(self.retiring)}

    def workers_per_engine(self) -> int:
        return self.cfg.tensor_parallel

    def shutdown(self) -> None:
        for i in sorted(self.alive | self.retiring | set(self.starting)):
            try:
                ray.get(self.actors[i].shutdown.remote(), timeout=60 if i not in self.starting else 1)
            except Exception:  # noqa: BLE001 - teardown: the kill below still happens
                pass
            self.terminate(i)
