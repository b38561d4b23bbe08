"""The torch learner backend: a Hugging Face causal LM trained with plain torch, on CPU or GPU.

Data parallel over ``torch.distributed`` (gloo on CPU, NCCL on GPU) when the default process group
is initialised with more than one rank (``actors.learner`` does that): every rank trains on its
shard of the batch and gradients are summed with ``all_reduce`` after being scaled by the rank's
share of the *global* token (or sequence) count, so the update equals the single-process one.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import torch

from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.losses import grpo_loss, masked_entropy, sft_loss, truncated_is_weight

log = logging.getLogger(__name__)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   temperature: float = 1.0, return_logits: bool = False):
    """``[B, L]`` logprob of each token given its prefix (position 0 gets 0)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float() / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    lp = torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)
    return (lp, logits) if return_logits else lp


class TorchBackend:
    """:class:`learner.backend.LearnerBackend` on a ``transformers`` model."""

    def __init__(self, model_path: str, cfg: LearnerConfig, temperature: float = 1.0,
                 device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.temperature = temperature
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available()
                                              and cfg.gpus_per_actor > 0 else "cpu"))
        dtype = getattr(torch, cfg.dtype)
        torch.manual_seed(cfg.seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.train()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.ref = None
        if cfg.loss.kl_coef > 0:
            self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
            self.ref.eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        self.version = 0

    # ---- distributed helpers ------------------------------------------------------------------
    @staticmethod
    def _world() -> int:
        import torch.distributed as dist
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @staticmethod
    def _rank() -> int:
        import torch.distributed as dist
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def dp_rank(self) -> int:  # every rank holds the whole model: pure data parallel
        return self._rank()

    @property
    def dp_size(self) -> int:
        return self._world()

    def _global_sum(self, x: float) -> float:
        if self._world() == 1:
            return x
        import torch.distributed as dist
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def _reduce_grads(self) -> None:
        if self._world() == 1:
            return
        import torch.distributed as dist
        for p in self.model.parameters():  # every rank reduces every tensor, even with no grad
            if p.grad is None:             # (an empty shard): the collectives must line up
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    # ---- exact in-stage checkpoints ----------------------------------------------------------
    def save_state(self, path: str) -> None:
        """What continuing bit-exactly needs, into ``path/rank<r>.pt``: the weights (exact
        dtype), the optimizer state, the weight version and this process's RNG states. The
        reference model is not saved: it is the stage's input checkpoint, reloaded bit-identical.
        Resuming with another ``learner.threads`` may change float summation order."""
        import random

        import numpy as np

        os.makedirs(path, exist_ok=True)
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "version": self.version,
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "numpy": np.random.get_state(),
                         "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None}}
        tmp = os.path.join(path, f".rank{self._rank()}.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(path, f"rank{self._rank()}.pt"))

    def load_state(self, path: str) -> None:
        import random

        import numpy as np

        f = os.path.join(path, f"rank{self._rank()}.pt")
        if not os.path.exists(f):
            raise FileNotFoundError(f"{f}: no learner state for rank {self._rank()} (written by a "
                                    "learner with another learner.num_actors?)")
        state = torch.load(f, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.version = state["version"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _step(self) -> float:
        self._reduce_grads()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def _micro(self, batch: TrainBatch) -> Iterator[TrainBatch]:
        for i in range(0, len(batch), self.cfg.micro_batch_size):
            yield batch.slice(i, i + self.cfg.micro_batch_size).to(self.device)

    # ---- LearnerBackend -----------------------------------------------------------------------
    @torch.no_grad()
    def logprobs(self, batch: TrainBatch, model=None) -> torch.Tensor:
        model = model if model is not None else self.model
        width = batch.input_ids.shape[1]
        if len(batch) == 0:
            return torch.zeros((0, width))
        out = [token_logprobs(model, mb.input_ids, mb.attention_mask, self.temperature).cpu()
               for mb in self._micro(batch)]
        return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1])) for o in out])

    def train_grpo(self, batch: TrainBatch) -> dict[str, float]:
        """``learner.mini_batches`` optimizer steps on ``batch``; the version advances by one."""
        lc = self.cfg.loss
        token_level = lc.aggregation == "token_mean"
        with torch.no_grad():  # taken once, before any update: the PPO "old" policy
            ref_all = self.logprobs(batch, self.ref) if self.ref is not None else None
            old_all = self.logprobs(batch) if lc.old_logprobs == "learner" else None
        # the same number of optimizer steps (and so of collectives) on every data-parallel rank,
        # whatever its shard size: a short shard gets empty mini-batches, not fewer of them
        n_mini = self.cfg.mini_batches
        bounds = [len(batch) * i // n_mini for i in range(n_mini + 1)]
        sums: dict[str, float] = {}
        norms = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mini = batch.slice(lo, hi)
            local = float(mini.response_mask.sum()) if token_level else float(len(mini))
            total = self._global_sum(local)
            for off in range(0, len(mini), self.cfg.micro_batch_size):
                end = min(off + self.cfg.micro_batch_size, len(mini))
                mb = mini.slice(off, end).to(self.device)
                sl = slice(lo + off, lo + end)
                ref_lp = ref_all[sl].to(self.device) if ref_all is not None else None
                if old_all is not None:
                    old_lp = old_all[sl].to(self.device)
                    is_w = truncated_is_weight(old_lp, mb.rollout_logprobs, lc.tis_cap)
                else:
                    old_lp, is_w = mb.rollout_logprobs, None
                lp, logits = token_logprobs(self.model, mb.input_ids, mb.attention_mask,
                                            self.temperature, return_logits=True)
                width = lp.shape[1]
                mask = mb.response_mask
                old_lp, ref_lp = old_lp[:, :width], (ref_lp[:, :width] if ref_lp is not None else None)
                loss, st = grpo_loss(lp, old_lp, mb.advantages, mask, lc.clip_low, lc.clip_high,
                                     ref_lp, lc.kl_coef, is_w, lc.aggregation, lc.norm_len or None,
                                     lc.clip_ratio_c)
                units = float(mask.sum()) if token_level else float(len(mb))
                (loss * (units / total)).backward()
                ntok = float(mask.sum())
                with torch.no_grad():
                    st["entropy"] = masked_entropy(logits, mask[:, 1:])
                    st["logprob_mismatch"] = float(((old_lp - mb.rollout_logprobs).abs() * mask).sum()
                                                   / mask.sum().clamp_min(1)) if old_all is not None else 0.0
                    if is_w is not None:
                        st["is_weight_mean"] = float((is_w * mask).sum() / mask.sum().clamp_min(1))
                st["loss"] = float(loss)
                for k, v in st.items():  # token-weighted means over micro-batches
                    sums[k] = sums.get(k, 0.0) + v * ntok
                sums["_tokens"] = sums.get("_tokens", 0.0) + ntok
            norms.append(self._step())
        self.version += 1
        ntok = max(sums.pop("_tokens", 0.0), 1.0)
        out = {k: v / ntok for k, v in sums.items()}
        out["grad_norm"] = sum(norms) / len(norms)
        return out

    def train_sft(self, batch: TrainBatch) -> dict[str, float]:
        total = self._global_sum(float(batch.response_mask.sum()))
        loss_sum = 0.0
        for mb in self._micro(batch):
            lp = token_logprobs(self.model, mb.input_ids, mb.attention_mask, 1.0)
            n = float(mb.response_mask.sum())
            loss = sft_loss(lp, mb.response_mask)
            (loss * (n / total)).backward()
            loss_sum += float(loss) * n
        grad_norm = self._step()
        self.version += 1
        return {"sft_loss": loss_sum / max(float(batch.response_mask.sum()), 1.0),
                "grad_norm": grad_norm}

    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            yield name, p.detach()

    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._rank() == 0:  # every rank holds the same weights: rank 0 speaks for them
            yield from self.named_hf_weights()

    def save_hf(self, path: str) -> None:
        if self._rank() == 0:
            self.model.save_pretrained(path, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
