"""Learner actors: one backend per process over the default torch.distributed group (data parallel
for the torch backend; tensor / pipeline / expert / data parallel for Megatron), and rank 0
exporting the weights to the rollout engines while the other ranks take part in the gathers."""
from __future__ import annotations

import logging
import os

import ray

from actors.common import free_port, get_all, gpu_ids
from learner.batch import collate
from learner.config import LearnerConfig
from rollout.types import from_arrow
from rollout.weights import GroupSpec

log = logging.getLogger(__name__)


def make_backend(model_path: str, cfg: LearnerConfig, temperature: float):
    if cfg.backend == "torch":
        from learner.torch_backend import TorchBackend
        return TorchBackend(model_path, cfg, temperature)
    if cfg.backend == "megatron":
        from learner.megatron.backend import MegatronBackend  # GPU only; see learner/megatron
        return MegatronBackend(model_path, cfg, temperature=temperature)
    raise ValueError(f"unknown learner backend {cfg.backend!r}")


@ray.remote
class LearnerActor:
    def __init__(self, model_path: str, cfg: LearnerConfig, temperature: float, rank: int,
                 world: int, master: tuple[str, int] | None, timeout_s: float = 600.0):
        import datetime

        import torch
        import torch.distributed as dist

        logging.basicConfig(level=logging.INFO)
        # cfg.threads: N, 0 = Ray's setting (the actor's num_cpus), -1 = every core we may run on
        # (the controller's resolution of learner.threads: auto); AHA_LEARNER_THREADS overrides
        want = int(os.environ.get("AHA_LEARNER_THREADS", "0")) or cfg.threads
        if want == -1:
            want = len(os.sched_getaffinity(0))
        if want > 0:
            torch.set_num_threads(want)
        self.rank, self.world = rank, world
        if world > 1:
            backend = "nccl" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "gloo"
            # ranks other than 0 may wait in a collective while rank 0 feeds busy engines: give
            # them the job's timeout, not the 10 min default
            dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}",
                                    rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=max(600.0, timeout_s)))
        self.backend = make_backend(model_path, cfg, temperature)
        tok = getattr(self.backend, "tokenizer", None)
        if tok is None:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.sender = None

    def ready(self) -> int:
        return self.backend.version

    def _batch(self, arrow, with_advantages: bool = True):
        samples = from_arrow(arrow)
        ref = [s.ref_logprobs for s in samples]  # learner.reference: pool
        batch = collate([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                        [s.response_logprobs for s in samples],
                        [s.advantage for s in samples] if with_advantages else None, self.pad_id,
                        ref_logprobs=ref if ref and all(r is not None for r in ref) else None)
        # data-parallel replicas split the batch; tensor/pipeline-parallel ranks of one replica
        # all see that replica's rows
        return batch.shard(self.backend.dp_rank, self.backend.dp_size)

    def train_grpo(self, arrow) -> dict:
        out = self.backend.train_grpo(self._batch(arrow))
        out["weight_version"] = self.backend.version
        return out

    def train_sft(self, arrow) -> dict:
        out = self.backend.train_sft(self._batch(arrow, with_advantages=False))
        out["weight_version"] = self.backend.version
        return out

    # ---- weight export. Every rank calls these (a model-parallel backend gathers its weights with
    # collectives); rank 0 alone holds a sender and talks to the engines. ----
    def _drain(self, named) -> None:
        for _ in named:
            pass

    def init_sender(self, spec: GroupSpec, bucket_bytes: int, wire_dtype: str | None):
        """``torch_dist``: rank 0 joins the weight-sync group; returns the wire layout (rank 0)."""
        named = self.backend.export_hf_weights()
        if self.rank != 0:
            return self._drain(named)
        from learner.weight_sync import TorchDistSender
        self.sender = TorchDistSender(spec, bucket_bytes, wire_dtype)
        return self.sender.metas(named)

    def init_native_sender(self, backend: str, endpoints: list, bucket_bytes: int,
                           nccl: tuple[str, int, list[int]] | None = None) -> int:
        """``vllm_ipc`` / ``vllm_nccl``: rank 0 builds a vLLM-native sender to ``endpoints``
        (``actors.rollout.RayEngineEndpoint``); NCCL also forms the group (``nccl`` = host, port,
        workers per engine) and learns the stream's layout (a collective pass on every rank)."""
        if backend == "ipc" and self.world > 1:
            raise ValueError("vllm_ipc streams from a single learner process; use vllm_nccl")
        if self.rank == 0:
            from learner.megatron.weight_stream import WeightStreamSender
            self.sender = WeightStreamSender(backend, endpoints, bucket_bytes)
        if backend != "nccl":
            return 0
        named = self.backend.export_hf_weights()
        if self.rank != 0:
            return self._drain(named) or 0
        host, port, sizes = nccl
        self.sender.connect_nccl(host, port, sizes)
        return self.sender.learn_layout(named)

    def send_weights(self) -> dict:
        """Stream the current weights to every engine; ``{"bytes", "seconds", "version"}`` on
        rank 0, ``{}`` elsewhere."""
        named = self.backend.export_hf_weights()
        if self.sender is None:
            self._drain(named)
            return {}
        out = self.sender.send(named, self.backend.version)
        return {"bytes": out["bytes"], "seconds": out["seconds"], "version": self.backend.version}

    def weights_by_value(self) -> tuple[list, int] | None:
        named = self.backend.export_hf_weights()
        if self.rank != 0:
            return self._drain(named)
        return [(n, t.detach().cpu().clone()) for n, t in named], self.backend.version

    def save_hf(self, path: str) -> str:
        self.backend.save_hf(path)  # collective; the backend writes from the ranks that hold data
        return path

    def version(self) -> int:
        return self.backend.version

    def save_state(self, path: str, save_ref: bool = True) -> str:
        """Collective: the backend's exact training state into the directory ``path`` (see
        :meth:`learner.backend.LearnerBackend.save_state`; each rank writes its own RNG file)."""
        self.backend.save_state(path, save_ref=save_ref)
        return path

    def load_state(self, path: str) -> int:
        """Collective: restore :meth:`save_state`'s state; returns the restored weight version."""
        self.backend.load_state(path)
        return self.backend.version

    def free_port(self) -> tuple[str, int]:
        return free_port()

    def gpu_ids(self) -> list[str]:
        return gpu_ids()


class LearnerGroup:
    """``cfg.num_actors`` data-parallel learner actors; rank 0 answers for the group."""

    def __init__(self, model_path: str, cfg: LearnerConfig, temperature: float,
                 num_cpus: float = 1.0, timeout_s: float = 600.0, resources: dict | None = None):
        self.cfg, self.timeout_s = cfg, timeout_s
        master = free_port() if cfg.num_actors > 1 else None
        self.actors = [LearnerActor.options(num_cpus=num_cpus, num_gpus=cfg.gpus_per_actor,
                                            resources=dict(resources or {})).remote(
            model_path, cfg, temperature, r, cfg.num_actors, master, timeout_s)
            for r in range(cfg.num_actors)]
        get_all([a.ready.remote() for a in self.actors], "learner start", timeout_s)

    @property
    def rank0(self):
        return self.actors[0]

    def _all(self, method: str, *args):
        args = tuple(ray.put(a) if hasattr(a, "num_rows") else a for a in args)  # Arrow: put once
        return get_all([getattr(a, method).remote(*args) for a in self.actors], f"learner.{method}",
                       self.timeout_s)

    def train_grpo(self, arrow) -> dict:
        return self._all("train_grpo", arrow)[0]

    def train_sft(self, arrow) -> dict:
        return self._all("train_sft", arrow)[0]

    def save_hf(self, path: str) -> str:
        return self._all("save_hf", path)[0]

    def save_state(self, path: str, save_ref: bool = True) -> str:
        """Every rank writes its part of the exact training state into ``path`` (blocks until all
        have); returns ``path``. Files are written in place: pass a temporary directory and rename
        it to make the state appear atomically."""
        return self._all("save_state", path, save_ref)[0]

    def load_state(self, path: str) -> int:
        """Every rank restores :meth:`save_state`'s state (blocks); returns the weight version."""
        return self._all("load_state", path)[0]

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
