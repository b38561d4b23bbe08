"""The torch learner backend: a Hugging Face causal LM trained with plain torch, on CPU or GPU.

Data parallel over ``torch.distributed`` (gloo on CPU, NCCL on GPU) when the default process group
is initialised with more than one rank (``actors.learner`` does that): every rank trains on its
shard of the batch and gradients are summed with ``all_reduce`` after being scaled by the rank's
share of the *global* token (or sequence) count, so the update equals the single-process one.

``learner.compute_dtype: bfloat16`` (or ``auto`` where bf16 is native) is mixed precision with
master weights: the float32 model holds the parameters (what the optimizer steps, the engines
receive and a checkpoint saves), and a bf16 working copy of it (its parameters cast, its buffers
such as RoPE frequencies kept in float32) runs every forward and backward; its gradients are added
into float32 ones after each micro-batch, and it is refreshed after each optimizer step. The
frozen reference is kept in bf16 alone. On CPU the bf16 working copy uses eager attention: SDPA's
bf16 backward was 8x its float32 one there (bench/README.md); the reference, which never runs
backward, keeps SDPA.

``save_state`` / ``load_state`` make a stage resumable bit for bit (see :meth:`TorchBackend.save_state`
for the files). Every data-parallel rank holds the same weights and optimizer state (the gradients
are all-reduced, AdamW is elementwise), which the save checks with a fingerprint: rank 0 then writes
them once, and each rank writes its own RNG states.
"""
from __future__ import annotations

import logging
import os
from typing import Iterator

import torch

from learner.backend import (read_state_meta, rng_state, set_rng_state, tensor_digest,
                             write_state_meta)
from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.losses import grpo_loss, masked_entropy, sft_loss, truncated_is_weight
from learner.precision import cast_parameters, resolve_compute_dtype
from learner.prefix import ResponseLogprobs, token_logprobs
from learner.reference import Reference, ReferenceSpec

log = logging.getLogger(__name__)


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
        # learner.compute_dtype (module docstring): with float32 parameters and bf16 compute,
        # ``work`` is the bf16 copy that runs forward and backward; otherwise it is the model
        self.compute_dtype = (dtype if dtype == torch.bfloat16
                              else resolve_compute_dtype(cfg.compute_dtype, self.device))
        self._work, self._pairs = None, []  # (float32 master, bf16 working) parameter pairs
        if self.compute_dtype != dtype:
            import copy
            self._work = cast_parameters(copy.deepcopy(self.model), self.compute_dtype).train()
            self._pairs = list(zip(self.model.parameters(), self._work.parameters()))
        # the frozen KL reference (learner.reference: learner); with ``pool`` reference actors hold
        # it and every batch brings its reference logprobs (learner.reference)
        self.reference = None
        if cfg.loss.kl_coef > 0 and cfg.reference == "learner":
            self.reference = Reference(model_path, ReferenceSpec.of(cfg, temperature), self.device)
        self.ref = self.reference.model if self.reference is not None else None
        if self.compute_dtype == torch.bfloat16 and self.device.type == "cpu":
            self.work.set_attn_implementation("eager")  # the reference never runs backward: SDPA
        if cfg.compute_dtype != "float32":
            log.info("learner: parameters %s, forward and backward in %s (compute_dtype: %s)",
                     cfg.dtype, self._compute_name(), cfg.compute_dtype)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                     weight_decay=cfg.weight_decay)
        self.version = 0
        self._fwd = ResponseLogprobs(cfg.share_prompts, temperature)  # learner.share_prompts

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


    @property
    def work(self):
        """The module that runs forward and backward: the bf16 working copy, or the model itself."""
        return self.model if self._work is None else self._work

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` through the working copy, its gradients added into the float32 ones."""
        loss.backward()
        for master, w in self._pairs:
            if w.grad is not None:
                g = w.grad.to(master.dtype)
                master.grad = g if master.grad is None else master.grad.add_(g)
                w.grad = None

    def _refresh_work(self) -> None:
        with torch.no_grad():
            for master, w in self._pairs:
                w.copy_(master)

    def _step(self) -> float:
        self._reduce_grads()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._refresh_work()
        return float(norm)

    def _micro(self, batch: TrainBatch) -> Iterator[TrainBatch]:
        for i in range(0, len(batch), self.cfg.micro_batch_size):
            yield batch.slice(i, i + self.cfg.micro_batch_size).to(self.device)

    def _logprobs(self, model, mb: TrainBatch, return_logits: bool = False):
        """Response logprobs of ``mb`` (see :mod:`learner.prefix`); with ``return_logits`` also
        ``(logits, mask)`` for the entropy."""
        return self._fwd(model, mb, return_logits)

    @property
    def _share_ok(self) -> bool:
        return self._fwd.share

    # ---- LearnerBackend -----------------------------------------------------------------------
    def logprobs(self, batch: TrainBatch, model=None) -> torch.Tensor:
        return self._fwd.batch(model if model is not None else self.work, batch,
                               self.cfg.micro_batch_size, self.device)

    def train_grpo(self, batch: TrainBatch) -> dict[str, float]:
        """``learner.mini_batches`` optimizer steps on ``batch``; the version advances by one."""
        lc = self.cfg.loss
        token_level = lc.aggregation == "token_mean"
        recompute = lc.old_logprobs == "learner"
        # the same number of optimizer steps (and so of collectives) on every data-parallel rank,
        # whatever its shard size: a short shard gets empty mini-batches, not fewer of them
        n_mini = self.cfg.mini_batches
        bounds = [len(batch) * i // n_mini for i in range(n_mini + 1)]
        with torch.no_grad():  # taken once, before any update: the PPO "old" policy
            ref_all = batch.ref_logprobs  # learner.reference: pool
            if ref_all is None and self.ref is not None:
                ref_all = self.reference.logprobs(batch)
            elif ref_all is None and lc.kl_coef > 0:
                raise ValueError("learner.loss.kl_coef > 0 with learner.reference: pool, but this "
                                 "batch has no reference logprobs (Sample.ref_logprobs): the job ran "
                                 "no reference actors")
            # the first mini-batch's old logprobs are its own update forward's (the weights have
            # not moved yet): only the later mini-batches need a forward of their own
            old_rest = self.logprobs(batch.slice(bounds[1], len(batch))) if recompute else None
        sums: dict[str, float] = {}
        norms = []
        for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            mini = batch.slice(lo, hi)
            local = float(mini.response_mask.sum()) if token_level else float(len(mini))
            total = self._global_sum(local)
            for off in range(0, len(mini), self.cfg.micro_batch_size):
                end = min(off + self.cfg.micro_batch_size, len(mini))
                mb = mini.slice(off, end).to(self.device)
                sl = slice(lo + off, lo + end)
                ref_lp = ref_all[sl].to(self.device) if ref_all is not None else None
                lp, (logits, logits_mask) = self._logprobs(self.work, mb, return_logits=True)
                if recompute:
                    old_lp = lp.detach() if j == 0 else \
                        old_rest[lo + off - bounds[1]:lo + end - bounds[1]].to(self.device)
                    is_w = truncated_is_weight(old_lp, mb.rollout_logprobs, lc.tis_cap)
                else:
                    old_lp, is_w = mb.rollout_logprobs, None
                width = lp.shape[1]
                mask = mb.response_mask
                old_lp, ref_lp = old_lp[:, :width], (ref_lp[:, :width] if ref_lp is not None else None)
                loss, st = grpo_loss(lp, old_lp, mb.advantages, mask, lc.clip_low, lc.clip_high,
                                     ref_lp, lc.kl_coef, is_w, lc.aggregation, lc.norm_len or None,
                                     lc.clip_ratio_c)
                units = float(mask.sum()) if token_level else float(len(mb))
                self._backward(loss * (units / total))
                ntok = float(mask.sum())
                with torch.no_grad():
                    st["entropy"] = masked_entropy(logits, logits_mask)
                    st["logprob_mismatch"] = float(((old_lp - mb.rollout_logprobs).abs() * mask).sum()
                                                   / mask.sum().clamp_min(1)) if recompute else 0.0
                    if is_w is not None:
                        st["is_weight_mean"] = float((is_w * mask).sum() / mask.sum().clamp_min(1))
                st["loss"] = float(loss.detach())
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
            lp = token_logprobs(self.work, mb.input_ids, mb.attention_mask, 1.0)
            n = float(mb.response_mask.sum())
            loss = sft_loss(lp, mb.response_mask)
            self._backward(loss * (n / total))
            loss_sum += float(loss.detach()) * n
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

    # ---- exact training state -----------------------------------------------------------------
    def _compute_name(self) -> str:
        return str(self.compute_dtype).removeprefix("torch.")

    @staticmethod
    def _module_tensors(module) -> dict[str, torch.Tensor]:
        """Every parameter and buffer (non-persistent ones too) by name, tied weights once."""
        out = dict(module.named_parameters())
        out.update(module.named_buffers())
        return {n: t.detach() for n, t in out.items()}

    @classmethod
    def _load_module(cls, module, file: str) -> None:
        from safetensors.torch import load_file
        saved, own = load_file(file), cls._module_tensors(module)
        if saved.keys() != own.keys():
            raise KeyError(f"{file} does not fit the model: missing {sorted(own.keys() - saved.keys())[:6]}, "
                           f"unexpected {sorted(saved.keys() - own.keys())[:6]}")
        with torch.no_grad():
            for n, t in own.items():
                if t.shape != saved[n].shape or t.dtype != saved[n].dtype:
                    raise ValueError(f"{file}: {n} is {saved[n].dtype}{tuple(saved[n].shape)}, the "
                                     f"model has {t.dtype}{tuple(t.shape)}")
                t.copy_(saved[n])

    def _gather_object(self, obj) -> list:
        if self._world() == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self._world()
        dist.all_gather_object(out, obj)
        return out

    def save_state(self, path: str, save_ref: bool = True) -> None:
        """Collective: every rank calls it. Writes into ``path`` (created)::

            meta.json                backend, ranks, version, where the weights are, the reference
            model.safetensors        every parameter and buffer in its own dtype      (rank 0)
            optimizer.pt             AdamW's state_dict: moments, step counts, hyperparameters
            ref.safetensors          the frozen reference (kl_coef > 0 and save_ref)  (rank 0)
            rank{r}.pt               rank r: RNG states (torch CPU, CUDA, random, numpy), version

        Should the ranks' weights or optimizer states ever differ (they are all-reduced, so they
        should not), each rank writes its own as ``rank{r}.model.safetensors`` and
        ``rank{r}.optimizer.pt`` instead. ``save_ref=False`` writes the reference's fingerprint
        alone: it is the stage's input checkpoint, which the resumed backend loads again.

        Bit-exact continuation needs the same device, torch build and torch thread count
        (``learner.threads``) on both sides of the resume: CPU kernels split reductions by thread.
        """
        from safetensors.torch import save_file
        rank, world = self._rank(), self._world()
        rng = rng_state()
        model_t = self._module_tensors(self.model)
        opt_sd = self.opt.state_dict()
        ref_t = self._module_tensors(self.ref) if self.ref is not None else {}
        ref_digest = tensor_digest(ref_t.values()) if ref_t and (world > 1 or not save_ref) else None
        shared = True
        if world > 1:  # one pass over the weights and moments on each rank, no copy
            opt_t = [v for _, st in sorted(opt_sd["state"].items()) for _, v in sorted(st.items())
                     if torch.is_tensor(v)]
            digests = self._gather_object((tensor_digest([*model_t.values(), *opt_t]), ref_digest))
            shared = len(set(digests)) == 1
        if not shared and rank == 0:
            log.warning("learner ranks hold different weights or optimizer states; every rank "
                        "saves its own in %s", path)
        os.makedirs(path, exist_ok=True)
        prefix = "" if shared else f"rank{rank}."
        if rank == 0 or not shared:
            save_file({n: t.contiguous().cpu() for n, t in model_t.items()},
                      os.path.join(path, f"{prefix}model.safetensors"))
            torch.save(opt_sd, os.path.join(path, f"{prefix}optimizer.pt"))
            if ref_t and save_ref:
                save_file({n: t.contiguous().cpu() for n, t in ref_t.items()},
                          os.path.join(path, f"{prefix}ref.safetensors"))
        torch.save({"rank": rank, "world": world, "version": self.version, "rng": rng},
                   os.path.join(path, f"rank{rank}.pt"))
        if rank == 0:
            write_state_meta(path, backend="torch", world=world, version=self.version, shared=shared,
                             ref=None if self.ref is None else ("saved" if save_ref else "rebuilt"),
                             ref_digest=ref_digest, compute_dtype=self._compute_name())
        if world > 1:  # every rank's files are down before any returns
            import torch.distributed as dist
            dist.barrier()

    def load_state(self, path: str) -> None:
        """Inverse of :meth:`save_state`, on a backend freshly built from the checkpoint the saved run
        started from, with the same config and number of ranks; every rank calls it."""
        rank, world = self._rank(), self._world()
        meta = read_state_meta(path, "torch", world)
        saved_compute = meta.get("compute_dtype", self.cfg.dtype)  # older states: no field
        if saved_compute != self._compute_name():
            raise ValueError(f"{path} was trained with forward and backward in {saved_compute}, this "
                             f"learner computes in {self._compute_name()}: resume with the same "
                             "learner.compute_dtype (an exact resume needs the same arithmetic)")
        prefix = "" if meta["shared"] else f"rank{rank}."
        self._load_module(self.model, os.path.join(path, f"{prefix}model.safetensors"))
        self._refresh_work()
        self.opt.load_state_dict(torch.load(os.path.join(path, f"{prefix}optimizer.pt"),
                                            map_location="cpu", weights_only=True))
        if self.ref is not None:
            if meta["ref"] is None:
                raise ValueError(f"{path} was saved without a reference model (loss.kl_coef was 0, or "
                                 "learner.reference was pool); resume with the same "
                                 "learner.loss.kl_coef and learner.reference")
            if meta["ref"] == "saved":
                self._load_module(self.ref, os.path.join(path, f"{prefix}ref.safetensors"))
            elif tensor_digest(self._module_tensors(self.ref).values()) != meta["ref_digest"]:
                raise ValueError(f"{path} did not save the reference model, and the one this backend "
                                 "loaded differs from the saved run's: build the learner from the "
                                 "checkpoint the saved run started from")
        mine = torch.load(os.path.join(path, f"rank{rank}.pt"), map_location="cpu", weights_only=True)
        if (mine["rank"], mine["world"]) != (rank, world):
            raise ValueError(f"{path}/rank{rank}.pt belongs to rank {mine['rank']} of {mine['world']}")
        self.version = mine["version"]
        set_rng_state(mine["rng"])
