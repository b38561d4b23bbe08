"""Learner actors: one backend per process, data parallel over the default torch.distributed group,
and rank 0 exporting weights to the rollout engines."""
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
        return MegatronBackend(model_path, cfg)  # temperature 1 only (checked in cluster.config)
    raise ValueError(f"unknown learner backend {cfg.backend!r}")


@ray.remote
class LearnerActor:
    def __init__(self, model_path: str, cfg: LearnerConfig, temperature: float, rank: int,
                 world: int, master: tuple[str, int] | None):
        import torch
        import torch.distributed as dist

        logging.basicConfig(level=logging.INFO)
        torch.set_num_threads(max(1, int(os.environ.get("AHA_LEARNER_THREADS", "0")) or torch.get_num_threads()))
        self.rank, self.world = rank, world
        if world > 1:
            backend = "nccl" if torch.cuda.is_available() and cfg.gpus_per_actor > 0 else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{master[0]}:{master[1]}",
                                    rank=rank, world_size=world)
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
        batch = collate([s.prompt_ids for s in samples], [s.response_ids for s in samples],
                        [s.response_logprobs for s in samples],
                        [s.advantage for s in samples] if with_advantages else None, self.pad_id)
        return batch.shard(self.rank, self.world)

    def train_grpo(self, arrow) -> dict:
        out = self.backend.train_grpo(self._batch(arrow))
        out["weight_version"] = self.backend.version
        return out

    def train_sft(self, arrow) -> dict:
        out = self.backend.train_sft(self._batch(arrow, with_advantages=False))
        out["weight_version"] = self.backend.version
        return out

    # ---- weight export (rank 0) ----
    def init_sender(self, spec: GroupSpec, bucket_bytes: int, wire_dtype: str | None):
        from learner.weight_sync import TorchDistSender
        self.sender = TorchDistSender(spec, bucket_bytes, wire_dtype)
        return self.sender.metas(self.backend.named_hf_weights())

    def send_weights(self) -> dict:
        out = self.sender.send(self.backend.named_hf_weights(), self.backend.version)
        out["version"] = self.backend.version
        return out

    def weights_by_value(self) -> tuple[list, int]:
        return ([(n, t.detach().cpu().clone()) for n, t in self.backend.named_hf_weights()],
                self.backend.version)

    def save_hf(self, path: str) -> str:
        if self.rank == 0:
            self.backend.save_hf(path)
        return path

    def version(self) -> int:
        return self.backend.version

    def free_port(self) -> tuple[str, int]:
        return free_port()

    def gpu_ids(self) -> list[str]:
        return gpu_ids()


class LearnerGroup:
    """``cfg.num_actors`` data-parallel learner actors; rank 0 answers for the group."""

    def __init__(self, model_path: str, cfg: LearnerConfig, temperature: float,
                 num_cpus: float = 1.0, timeout_s: float = 600.0):
        self.cfg, self.timeout_s = cfg, timeout_s
        master = free_port() if cfg.num_actors > 1 else None
        self.actors = [LearnerActor.options(num_cpus=num_cpus, num_gpus=cfg.gpus_per_actor).remote(
            model_path, cfg, temperature, r, cfg.num_actors, master) for r in range(cfg.num_actors)]
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

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
