"""The Megatron-core learner backend: MoE (and dense) Qwen models, TP/PP/EP/DP, FP8 through TE.

:class:`MegatronBackend` implements :class:`learner.backend.LearnerBackend`. It builds a Megatron-core
``GPTModel`` with the Transformer Engine layer spec from a Hugging Face checkpoint (converted by
:mod:`learner.megatron.convert`), wraps it in Megatron's ``DistributedDataParallel`` with the
distributed optimizer (fp32 master weights and grads, gradient clipping) and trains the GRPO and SFT
objectives of :mod:`learner.losses` (the same functions the torch backend calls).

Where this departs from the torch backend, and why:

1. Parameters are BF16 with FP32 master weights in the optimizer whatever ``learner.dtype`` says;
   with ``learner.megatron.fp8: hybrid`` the GEMMs of the transformer layers run in FP8 (E4M3
   forward, E5M2 gradients) with delayed or current ("tensorwise") scaling. Embedding, output
   layer, router and attention core stay in BF16 (Megatron's default).
2. Logprobs come from Megatron's vocab-parallel cross entropy on the logits divided by the rollout
   temperature, so the full ``[B, L, V]`` logits are never gathered across tensor-parallel ranks;
   the entropy diagnostic is vocab-parallel too (:func:`learner.losses.token_entropy`).
3. Sequences are right-padded to a multiple of ``16 * tensor_parallel`` (FP8 GEMMs and sequence
   parallelism need it); padding is masked out and never routed for the aux loss.
4. Every micro-batch loss is rescaled so that the sum over micro-batches equals the loss
   :func:`learner.losses.grpo_loss` would give on the whole (local) batch, for every aggregation.
5. MoE: the router's top-k, aux-loss coefficient and balancing mode come from
   ``learner.megatron``; the aux loss (or the expert bias of aux-loss-free balancing) is Megatron's.
   ``train_grpo`` returns the router's load per expert (``moe/*`` metrics).
6. Pipeline parallel: ``named_hf_weights`` on a stage yields that stage's weights (global names);
   ``export_hf_weights`` brings every stage's part to global rank 0, which sends them to the
   engines. Training statistics are computed on the last stage and broadcast to the others.
7. ``save_state`` / ``load_state`` write one file per rank (its shards, optimizer state, RNG states
   including Megatron's CUDA RNG tracker); the FP32 main weights and Adam moments go through
   Megatron's ``save_parameter_state`` (gathered to each data-parallel group's first rank).

GPU only: megatron.core and transformer_engine are imported when the backend is built.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import torch

from learner import losses
from learner.backend import (read_state_meta, rng_state, set_rng_state, tensor_digest,
                             write_state_meta)
from learner.batch import TrainBatch
from learner.config import LearnerConfig
from learner.megatron import convert
from learner.megatron.spec import ModelSpec, Parallel, validate


@dataclass
class MegatronOptions:
    """Settings of the Megatron backend that :class:`learner.config.MegatronConfig` does not hold."""
    grouped_gemm: bool = True
    """TE grouped GEMM for the experts (one kernel for all local experts)."""
    token_dispatcher: str = "alltoall"
    """Megatron MoE token dispatcher: alltoall | allgather."""
    sequence_parallel: bool | None = None
    """Megatron sequence parallelism; None turns it on when tensor_parallel > 1."""
    recompute: bool = False
    """Full activation recomputation of every layer (memory for compute)."""
    router_dtype: str = "fp32"
    """Router softmax and expert-output weighting precision (fp32 keeps routing stable)."""
    fp8_amax_history_len: int = 16
    """Delayed scaling only: amax history window."""
    max_seq_len: int | None = None
    """Longest sequence the model will see; None takes max_position_embeddings."""
    attention_backend: str = "auto"
    """Megatron's attention backend: auto | flash | fused | unfused."""
    init_distributed: bool = True
    """Initialise torch.distributed from the environment (RANK, WORLD_SIZE, ...) if needed."""
    init_from_hf: bool = True
    """Load the checkpoint's weights; False keeps Megatron's random init (benchmarks: only
    config.json is read)."""


def _fp8_recipe_name(recipe: str) -> str:
    return {"delayed": "delayed", "current": "tensorwise"}[recipe]


class MegatronBackend:
    """:class:`learner.backend.LearnerBackend` on Megatron-core (GPU, NCCL).

    Args:
        model_path: Hugging Face checkpoint directory (config.json, safetensors, tokenizer).
        cfg: the learner config (``cfg.backend == "megatron"``); validated here.
        options: :class:`MegatronOptions`.

    Every rank of the job constructs one (``torch.distributed`` world = the learner's GPUs).
    ``temperature``: the rollout's sampling temperature; logprobs are those of the logits divided
    by it, as vLLM's processed logprobs are.
    """

    def __init__(self, model_path: str, cfg: LearnerConfig, options: MegatronOptions | None = None,
                 temperature: float = 1.0):
        cfg.validate()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.cfg, self.opts, self.model_path = cfg, options or MegatronOptions(), model_path
        self.temperature = temperature
        self.spec = ModelSpec.from_pretrained(model_path)
        self._init_distributed()
        world = torch.distributed.get_world_size()
        self.par: Parallel = validate(cfg.megatron, self.spec, world, cfg.micro_batch_size)
        self.version = 0
        self._setup_parallel_state()
        self.tcfg = self._transformer_config()
        self.model = self._build_model(self.tcfg)
        if self.opts.init_from_hf:
            self._load_hf_weights(self.model)
        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            self.ref_model = self._build_model(self._transformer_config())
            self.ref_model.load_state_dict(self.model.state_dict())
            self.ref_model.eval().requires_grad_(False)
        self._wrap_ddp_and_optimizer()
        self._router_counts: list[torch.Tensor] = []
        self._count_routes = False
        self._pad_mask_flat: torch.Tensor | None = None
        self._install_router_hooks()

    # ------------------------------------------------------------------ setup
    def _init_distributed(self) -> None:
        if torch.distributed.is_initialized() or not self.opts.init_distributed:
            if not torch.distributed.is_initialized():
                raise RuntimeError("torch.distributed is not initialised and init_distributed=False")
            return
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:  # a free one: two jobs on one node must not collide
            from rollout.weights import free_tcp_port
            os.environ["MASTER_PORT"] = str(free_tcp_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        torch.distributed.init_process_group("nccl", device_id=torch.device("cuda", local))

    def _setup_parallel_state(self) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(
                tensor_model_parallel_size=self.par.tp, pipeline_model_parallel_size=self.par.pp,
                expert_model_parallel_size=self.par.ep, expert_tensor_parallel_size=1)
        model_parallel_cuda_manual_seed(self.cfg.seed)
        self.ps = ps

    def _transformer_config(self):
        from megatron.core.transformer.enums import AttnBackend
        from megatron.core.transformer.transformer_config import TransformerConfig
        s, m, o = self.spec, self.cfg.megatron, self.opts
        sp = o.sequence_parallel if o.sequence_parallel is not None else self.par.tp > 1
        kw = dict(
            num_layers=s.num_layers, hidden_size=s.hidden_size, num_attention_heads=s.num_heads,
            num_query_groups=s.num_kv_heads, kv_channels=s.head_dim,
            ffn_hidden_size=s.ffn_hidden_size or s.moe_ffn_hidden_size,
            normalization="RMSNorm", layernorm_epsilon=s.rms_eps, gated_linear_unit=True,
            activation_func=torch.nn.functional.silu, add_bias_linear=False,
            add_qkv_bias=s.qkv_bias, qk_layernorm=s.qk_norm,
            hidden_dropout=0.0, attention_dropout=0.0,
            bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16,
            tensor_model_parallel_size=self.par.tp, pipeline_model_parallel_size=self.par.pp,
            expert_model_parallel_size=self.par.ep, expert_tensor_parallel_size=1,
            sequence_parallel=sp, attention_backend=AttnBackend[o.attention_backend],
            bias_activation_fusion=True, masked_softmax_fusion=True, persist_layer_norm=True,
            apply_rope_fusion=False,
        )
        if o.recompute:
            kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if m.fp8:
            kw.update(fp8=m.fp8, fp8_recipe=_fp8_recipe_name(m.fp8_recipe))
            if m.fp8_recipe == "delayed":
                kw.update(fp8_amax_history_len=o.fp8_amax_history_len, fp8_amax_compute_algo="max")
        if s.is_moe:
            balancing = m.moe_router_load_balancing
            kw.update(
                num_moe_experts=s.num_experts, moe_ffn_hidden_size=s.moe_ffn_hidden_size,
                moe_router_topk=m.moe_router_topk or s.moe_topk,
                # Qwen2-MoE: softmax over all experts, then top-k, no renormalisation (pre-softmax);
                # Qwen3-MoE: renormalised top-k == softmax over the top-k logits (Megatron default).
                moe_router_pre_softmax=not s.norm_topk_prob, moe_router_score_function="softmax",
                moe_router_dtype=o.router_dtype, moe_grouped_gemm=o.grouped_gemm,
                moe_token_dispatcher_type=o.token_dispatcher,
                moe_router_load_balancing_type="none" if balancing == "none" else balancing,
                moe_aux_loss_coeff=0.0 if balancing == "none" else m.moe_aux_loss_coef,
                moe_router_enable_expert_bias=balancing == "none",
                moe_permute_fusion=False,
            )
            if s.shared_expert_size:
                kw.update(moe_shared_expert_intermediate_size=s.shared_expert_size,
                          moe_shared_expert_gate=True)
        return TransformerConfig(**kw)

    def _build_model(self, tcfg):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        from megatron.core.models.gpt.gpt_model import GPTModel
        s = self.spec
        layer_spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=s.num_experts or None, moe_grouped_gemm=self.opts.grouped_gemm,
            qk_layernorm=s.qk_norm)
        theta = s.rope_theta
        model = GPTModel(
            config=tcfg, transformer_layer_spec=layer_spec, vocab_size=s.vocab_size,
            max_sequence_length=self.opts.max_seq_len or s.max_position_embeddings,
            pre_process=self.ps.is_pipeline_first_stage(), post_process=self.ps.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=s.tie_embeddings, parallel_output=True,
            position_embedding_type="rope", rotary_percent=1.0,
            rotary_base=int(theta) if float(theta).is_integer() else theta,
        )
        return model.cuda(torch.cuda.current_device())

    def _rank_coords(self) -> dict:
        ps = self.ps
        return dict(tp=self.par.tp, tp_rank=ps.get_tensor_model_parallel_rank(),
                    pp=self.par.pp, pp_rank=ps.get_pipeline_model_parallel_rank(),
                    ep=self.par.ep, ep_rank=ps.get_expert_model_parallel_rank() if self.spec.is_moe else 0)

    @staticmethod
    def _comm_device() -> torch.device:
        """Where tensors for the learner's collectives live (NCCL: the current GPU)."""
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")

    @property
    def dp_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return self.ps.get_data_parallel_world_size()

    def _load_hf_weights(self, model) -> None:
        from safetensors.torch import load_file
        files = sorted(glob.glob(os.path.join(self.model_path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {self.model_path}")
        hf: dict[str, torch.Tensor] = {}
        for f in files:
            hf.update(load_file(f))
        mc = convert.hf_to_mcore(hf, self.spec, grouped_gemm=self.opts.grouped_gemm)
        del hf
        local = convert.shard(mc, self.spec, **self._rank_coords())
        own = model.state_dict()
        missing = [k for k in own if k not in local and not convert.is_mcore_only(k)]
        extra = [k for k in local if k not in own]
        if missing or extra:
            raise KeyError(f"Megatron model and converted checkpoint disagree: missing {missing[:6]}, "
                           f"unexpected {extra[:6]}")
        with torch.no_grad():
            for k, t in local.items():
                dst = own[k]
                if dst.shape != t.shape:
                    raise ValueError(f"{k}: model has {tuple(dst.shape)}, checkpoint {tuple(t.shape)}")
                dst.copy_(t.to(dst.dtype))

    def _wrap_ddp_and_optimizer(self) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        c = self.cfg
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=True)
        self.ddp = DistributedDataParallel(config=self.tcfg, ddp_config=ddp_cfg, module=self.model)
        ocfg = OptimizerConfig(optimizer="adam", lr=c.lr, min_lr=c.lr, weight_decay=c.weight_decay,
                               adam_beta1=c.betas[0], adam_beta2=c.betas[1], bf16=True,
                               params_dtype=torch.bfloat16, use_distributed_optimizer=True,
                               clip_grad=c.grad_clip)
        self.optimizer = get_megatron_optimizer(ocfg, [self.ddp])
        self.tcfg.no_sync_func = self.ddp.no_sync
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.tcfg.grad_scale_func = self.optimizer.scale_loss

    def _install_router_hooks(self) -> None:
        if not self.spec.is_moe:
            return
        from megatron.core.transformer.moe.router import TopKRouter
        routers = [m for m in self.model.modules() if isinstance(m, TopKRouter)]
        self._router_counts = [torch.zeros(self.spec.num_experts, device="cuda") for _ in routers]

        def hook(idx, _module, _inputs, output):
            if not self._count_routes:
                return
            routing_map = output[1]  # [tokens, experts] bool, tokens in [s, b] order
            with torch.no_grad():
                if self._pad_mask_flat is not None and routing_map.shape[0] == self._pad_mask_flat.numel():
                    routing_map = routing_map & ~self._pad_mask_flat.unsqueeze(1)
                self._router_counts[idx] += routing_map.sum(0).float()

        for i, r in enumerate(routers):
            r.register_forward_hook(partial(hook, i))

    # ------------------------------------------------------------------ batches
    def _micro_batches(self, batch: TrainBatch, extra: dict[str, torch.Tensor] | None = None):
        """Split into GPU micro-batches: ids, positions, labels and prediction-aligned tensors.

        Prediction position ``t`` predicts token ``t+1``: ``mask[:, t] = response_mask[:, t+1]``.
        """
        mult = 16 * self.par.tp
        B, L = batch.input_ids.shape
        Lp = -(-L // mult) * mult
        mbs = self.cfg.micro_batch_size
        dev = torch.device("cuda", torch.cuda.current_device())

        def pad(t: torch.Tensor, value=0):
            out = torch.full((t.shape[0], Lp), value, dtype=t.dtype)
            out[:, :L] = t
            return out

        ids = pad(batch.input_ids)
        attn = pad(batch.attention_mask)
        shifted = {"mask": pad(batch.response_mask)[:, 1:], "rollout": pad(batch.rollout_logprobs)[:, 1:]}
        for k, v in (extra or {}).items():  # [B, L] tensors in the batch's (token) alignment
            shifted[k] = pad(v)[:, 1:]
        out = []
        for s in range(0, B, mbs):
            n = min(mbs, B - s)
            rows = slice(s, s + n)
            mb_ids = ids[rows]
            if self.par.pp > 1 and n < mbs:  # pipeline p2p needs fixed shapes: pad with dummy rows
                mb_ids = torch.cat([mb_ids, mb_ids.new_zeros(mbs - n, Lp)])
            nb = mb_ids.shape[0]
            labels = torch.roll(mb_ids, -1, 1)
            labels[:, -1] = 0
            a = attn[rows]
            if nb > n:
                a = torch.cat([a, a.new_zeros(nb - n, Lp)])
            mb = {"ids": mb_ids.to(dev), "labels": labels.to(dev),
                  "pos": torch.arange(Lp, device=dev).unsqueeze(0).expand(nb, Lp),
                  "pad": (a == 0).to(dev), "n": n,
                  "adv": batch.advantages[rows].to(dev)}
            for k, v in shifted.items():
                mb[k] = v[rows].to(dev)
            out.append(mb)
        return self._equalize(out, Lp, list(shifted), dev), L

    def _equalize(self, micro: list[dict], Lp: int, keys: list[str], dev) -> list[dict]:
        """Pad with empty micro-batches (``n = 0``: no row counts, zero loss scale) up to the largest
        count of any data-parallel rank. Every rank must run as many as the others: the gradient
        reduction and MoE token dispatch are collectives, and data-parallel shards can differ by a
        row (or be empty when the batch is smaller than the data-parallel size)."""
        if self.par.dp == 1 and micro:
            return micro
        most = torch.tensor([len(micro)], device=dev)
        if self.par.dp > 1:
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX,
                                         group=self.ps.get_data_parallel_group())
        nb = self.cfg.micro_batch_size if self.par.pp > 1 else 1
        while len(micro) < max(1, int(most.item())):
            z = torch.zeros(nb, Lp, dtype=torch.long, device=dev)
            mb = {"ids": z, "labels": z.clone(), "pos": torch.arange(Lp, device=dev).expand(nb, Lp),
                  "pad": torch.zeros(nb, Lp, dtype=torch.bool, device=dev),
                  "count_pad": torch.ones(nb, Lp, dtype=torch.bool, device=dev),  # not counted
                  "n": 0, "adv": torch.zeros(0, device=dev)}
            for k in keys:
                mb[k] = torch.zeros(0, Lp - 1, device=dev)
            micro.append(mb)
        return micro

    def _run(self, micro, loss_fn, forward_only: bool, model=None):
        """Megatron's forward(-backward) schedule over ``micro``; returns the loss_fn dicts."""
        from megatron.core.pipeline_parallel import get_forward_backward_func
        model = model or self.ddp
        if model is not self.ddp:
            forward_only = True
        mbs = micro[0]["ids"].shape[0]

        def forward_step(it, m):
            mb = next(it)
            self._pad_mask_flat = mb.get("count_pad", mb["pad"]).t().reshape(-1)
            out = m(mb["ids"], mb["pos"], None, padding_mask=mb["pad"])  # last stage: logits
            return out, partial(loss_fn, mb)

        fb = get_forward_backward_func()
        return fb(forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
                  num_microbatches=len(micro), seq_length=micro[0]["ids"].shape[1],
                  micro_batch_size=mbs, forward_only=forward_only)

    def _last_stage_broadcast(self, t: torch.Tensor | None, shape, dtype=torch.float32) -> torch.Tensor:
        """``t`` from the last pipeline stage on every stage (no-op without PP)."""
        if self.par.pp == 1:
            return t
        if t is None:
            t = torch.empty(shape, dtype=dtype, device="cuda")
        torch.distributed.broadcast(t, src=self.ps.get_pipeline_model_parallel_last_rank(),
                                    group=self.ps.get_pipeline_model_parallel_group())
        return t

    def _scaled_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[b, s, V/tp]`` vocab-parallel logits -> FP32 logits / temperature (a fresh tensor)."""
        return logits.float() / self.temperature if self.temperature != 1.0 else logits.float()

    def _token_logprobs(self, scaled: torch.Tensor, mb: dict) -> torch.Tensor:
        """Prediction-aligned ``[n, Lp-1]`` logprobs from :meth:`_scaled_logits` (consumes it:
        Megatron's vocab-parallel cross entropy works in place)."""
        from megatron.core import tensor_parallel
        nll = tensor_parallel.vocab_parallel_cross_entropy(scaled, mb["labels"])
        return -nll[: mb["n"], :-1]

    @torch.no_grad()
    def _entropy(self, scaled: torch.Tensor, mb: dict, mask: torch.Tensor, chunk: int = 1024) -> float:
        """Mean entropy over the response tokens of the micro-batch (vocab-parallel, no grad),
        ``chunk`` positions at a time so its temporaries stay small next to the logits."""
        rows = scaled[: mb["n"], :-1].reshape(-1, scaled.shape[-1])
        idx = (mask.reshape(-1) > 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            return 0.0
        group = self.ps.get_tensor_model_parallel_group() if self.par.tp > 1 else None
        total = sum(losses.token_entropy(rows[idx[i: i + chunk]], group).sum()
                    for i in range(0, idx.numel(), chunk))
        return float(total) / idx.numel()  # one device sync per micro-batch, not per chunk

    def _logprobs_pred(self, micro, model=None) -> torch.Tensor:
        """Prediction-aligned ``[B, Lp-1]`` logprobs (no grad), on every PP stage."""
        def lf(mb, out):
            lp = self._token_logprobs(self._scaled_logits(out), mb)
            return lp.sum() * 0.0, {"lp": lp.detach()}

        was_training = (model or self.model).training
        (model or self.ddp).eval()
        with torch.no_grad():
            res = self._run(micro, lf, forward_only=True, model=model)
        if was_training:
            (model or self.ddp).train()
        B = sum(mb["n"] for mb in micro)
        Lp = micro[0]["ids"].shape[1]
        lp = torch.cat([r["lp"] for r in res]) if res else None
        return self._last_stage_broadcast(lp, (B, Lp - 1))

    # ------------------------------------------------------------------ LearnerBackend
    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        micro, L = self._micro_batches(batch)
        lp = self._logprobs_pred(micro)
        out = torch.zeros(len(batch), L)
        out[:, 1:] = lp[:, : L - 1].cpu()
        return out

    def _step(self, micro, loss_fn) -> tuple[list[dict], dict[str, float]]:
        """One optimizer step over ``micro`` (router counts accumulate until the caller reads them)."""
        self.ddp.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._count_routes = True
        t0 = time.perf_counter()
        try:
            res = self._run(micro, loss_fn, forward_only=False)
        finally:
            self._count_routes = False
        ok, grad_norm, _ = self.optimizer.step()
        torch.cuda.synchronize()
        return res, {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                     "update_skipped": float(not ok), "time/learner_step_s": time.perf_counter() - t0}

    def _train(self, micro, loss_fn, aggregation: str, mini_batches: int) -> dict[str, float]:
        """``mini_batches`` optimizer steps over consecutive groups of ``micro``; the version advances
        by one. Each micro-batch's loss is scaled so that a step's gradient is that of
        :mod:`learner.losses` on its mini-batch (``mb["scale"]``, read by ``loss_fn``)."""
        for c in self._router_counts:
            c.zero_()
        n_mini = min(mini_batches, len(micro))
        bounds = [len(micro) * i // n_mini for i in range(n_mini + 1)]
        res, steps = [], []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = micro[lo:hi]
            for mb, w in zip(part, self._weights(part, aggregation)):
                mb["scale"] = w * len(part)  # Megatron's schedule divides each loss by len(part)
            r, st = self._step(part, loss_fn)
            res += r
            steps.append(st)
        if any(st["update_skipped"] == 0.0 for st in steps):
            self.version += 1
        stats = {"grad_norm": sum(st["grad_norm"] for st in steps) / len(steps),
                 "update_skipped": sum(st["update_skipped"] for st in steps) / len(steps),
                 "time/learner_step_s": sum(st["time/learner_step_s"] for st in steps)}
        stats.update(self._router_metrics(len(micro)))
        return self._reduce_stats(res, self._weights(micro, aggregation), stats)

    @staticmethod
    def _weights(micro, aggregation: str) -> list[float]:
        """Per-micro-batch weight so that sum_i w_i * loss_i == the loss of all of ``micro``."""
        if aggregation == "token_mean":
            tokens = [float(mb["mask"][: mb["n"]].sum()) for mb in micro]
            total = max(sum(tokens), 1.0)
            return [t / total for t in tokens]
        n = max(sum(mb["n"] for mb in micro), 1)
        return [mb["n"] / n for mb in micro]

    def train_grpo(self, batch: TrainBatch) -> dict[str, float]:
        """``learner.mini_batches`` optimizer steps on ``batch`` (old logprobs taken once, before
        the first); the version advances by one."""
        lc = self.cfg.loss
        micro, L = self._micro_batches(batch)
        t0 = time.perf_counter()
        old = self._logprobs_pred(micro) if lc.old_logprobs == "learner" else None
        ref = self._logprobs_pred(micro, model=self.ref_model) if self.ref_model is not None else None
        t_old = time.perf_counter() - t0
        row = 0
        for mb in micro:
            n = mb["n"]
            if old is not None:
                mb["old"] = old[row: row + n]
            if ref is not None:
                mb["ref"] = ref[row: row + n]
            row += n

        def loss_fn(mb, out):
            n = mb["n"]
            if n == 0:  # padding micro-batch (see _equalize): no loss, no statistics
                return out.float().sum() * 0.0, {"tokens": 0.0}
            mask, rollout = mb["mask"][:n], mb["rollout"][:n]
            scaled = self._scaled_logits(out)
            entropy = self._entropy(scaled, mb, mask)  # before the cross entropy reuses `scaled`
            lp = self._token_logprobs(scaled, mb)
            if "old" in mb:
                old_lp = mb["old"]
                isw = losses.truncated_is_weight(old_lp, rollout, lc.tis_cap)
            else:
                old_lp, isw = rollout, None
            loss, st = losses.grpo_loss(
                lp, old_lp, mb["adv"], mask, clip_low=lc.clip_low, clip_high=lc.clip_high,
                ref_logprobs=mb.get("ref"), kl_coef=lc.kl_coef, is_weights=isw,
                aggregation=lc.aggregation, norm_len=lc.norm_len or None,
                clip_ratio_c=lc.clip_ratio_c)
            with torch.no_grad():
                fm = mask.float()
                k = fm.sum().clamp_min(1.0)
                st["mismatch_abs"] = float(((lp.detach() - rollout).abs() * fm).sum() / k)
                if old is not None:  # the engine/learner mismatch at the same weights (TIS input)
                    st["logprob_mismatch"] = float(((old_lp - rollout).abs() * fm).sum() / k)
                if isw is not None:
                    st["is_weight_mean"] = float((isw * fm).sum() / k)
                st["loss"] = float(loss.detach())
                st["entropy"] = entropy
                st["tokens"] = float(fm.sum())
            return loss * mb["scale"], st

        stats = self._train(micro, loss_fn, lc.aggregation, self.cfg.mini_batches)
        stats["time/old_logprobs_s"] = t_old
        return stats

    def train_sft(self, batch: TrainBatch) -> dict[str, float]:
        micro, _ = self._micro_batches(batch)

        def loss_fn(mb, out):
            n = mb["n"]
            if n == 0:  # padding micro-batch (see _equalize)
                return out.float().sum() * 0.0, {"tokens": 0.0}
            lp = self._token_logprobs(out.float(), mb)  # SFT: temperature 1, as the torch backend
            loss = losses.sft_loss(lp, mb["mask"][:n])
            return loss * mb["scale"], {"sft_loss": float(loss.detach()),
                                        "tokens": float(mb["mask"][:n].sum())}

        return self._train(micro, loss_fn, "token_mean", 1)

    def _reduce_stats(self, res: list[dict], weights: list[float], stats: dict) -> dict[str, float]:
        """Weighted means of the per-micro-batch stats; computed on the last PP stage and broadcast
        to the other stages, so every rank (rank 0 included) returns them."""
        if res:
            keys = {k for r in res for k in r if k != "tokens"}
            if self.par.dp > 1:  # a replica of padding micro-batches alone reports no keys
                seen = [None] * self.par.dp
                torch.distributed.all_gather_object(seen, keys, group=self.ps.get_data_parallel_group())
                keys = set().union(*seen)
            keys = sorted(keys)
            loss_stats = {k: sum(w * r.get(k, 0.0) for w, r in zip(weights, res)) for k in keys}
            tokens = sum(r.get("tokens", 0.0) for r in res)
            if self.par.dp > 1:  # every replica's rows count: mean of the means, sum of tokens
                t = torch.tensor([loss_stats[k] for k in keys] + [tokens], dtype=torch.float64,
                                 device=self._comm_device())
                torch.distributed.all_reduce(t, group=self.ps.get_data_parallel_group())
                loss_stats = {k: float(v) / self.par.dp for k, v in zip(keys, t[:-1].tolist())}
                tokens = float(t[-1])
            stats.update(loss_stats)
            stats["tokens"] = tokens
            stats["perf/tokens_per_s"] = stats["tokens"] / max(stats["time/learner_step_s"], 1e-9)
        if self.par.pp > 1:
            box = [stats if self.ps.is_pipeline_last_stage() else None]
            torch.distributed.broadcast_object_list(
                box, src=self.ps.get_pipeline_model_parallel_last_rank(),
                group=self.ps.get_pipeline_model_parallel_group())
            stats = {**box[0], **{k: v for k, v in stats.items() if k.startswith("time/")}}
        stats["version"] = float(self.version)
        return stats

    def _router_metrics(self, num_micro: int) -> dict[str, float]:
        if not self._router_counts:
            return {}
        counts = torch.stack(self._router_counts)  # [layers, experts]
        groups = [self.ps.get_data_parallel_group()]
        if self.tcfg.sequence_parallel:
            groups.append(self.ps.get_tensor_model_parallel_group())
        for g in groups:
            if torch.distributed.get_world_size(g) > 1:
                torch.distributed.all_reduce(counts, group=g)
        mean = counts.mean(1).clamp_min(1e-9)
        frac = counts / counts.sum(1, keepdim=True).clamp_min(1e-9)
        imb = counts.max(1).values / mean
        out = {
            "moe/load_imbalance": float(imb.mean()),
            "moe/load_imbalance_max": float(imb.max()),
            "moe/expert_load_cv": float((counts.std(1, unbiased=False) / mean).mean()),
            "moe/expert_frac_min": float(frac.min()),
            "moe/expert_frac_max": float(frac.max()),
            "moe/tokens_routed": float(counts.sum()),
        }
        for e, c in enumerate(counts.sum(0).tolist()):
            out[f"moe/tokens_per_expert/{e}"] = c
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
        tracker = get_moe_metrics_tracker()
        for name, entry in tracker.metrics.items():  # summed over micro-batches, per layer
            out[f"moe/{name}"] = float(entry.values.sum()) / max(1, len(self._router_counts)) / num_micro
        tracker.clear()
        return out

    # ------------------------------------------------------------------ exact training state
    @staticmethod
    def _cpu(sd: dict) -> dict:
        return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in sd.items()}

    @staticmethod
    def _loose_buffers(module) -> dict[str, torch.Tensor]:
        """Buffers outside the state dict (the MoE routers' token counts, ...)."""
        persistent = module.state_dict(keep_vars=True).keys()
        return {n: b.detach().cpu().clone() for n, b in module.named_buffers() if n not in persistent}

    @staticmethod
    def _set_loose_buffers(module, saved: dict[str, torch.Tensor]) -> None:
        own = dict(module.named_buffers())
        with torch.no_grad():
            for n, t in saved.items():
                own[n].copy_(t)

    @staticmethod
    def _weights_digest(sd: dict) -> int:
        return tensor_digest(v for k, v in sorted(sd.items())
                             if torch.is_tensor(v) and not k.endswith("_extra_state"))

    def _layout(self) -> dict:
        return dict(tp=self.par.tp, pp=self.par.pp, ep=self.par.ep, dp=self.par.dp)

    def save_state(self, path: str, save_ref: bool = True) -> None:
        """Collective: every rank calls it. Writes into ``path`` (created)::

            meta.json                 backend, ranks, parallel layout, version       (global rank 0)
            rank{r}.pt                rank r: its model shard's state_dict (BF16 weights, TE's FP8
                                      scaling state) and loose buffers, the optimizer's state_dict
                                      (param groups with Adam's step, grad scaler), the
                                      reference's shard (``save_ref``; else its weights' fingerprint
                                      and its FP8 scaling state), RNG states (torch CPU and CUDA,
                                      Megatron's CUDA RNG tracker, random, numpy), version
            rank{r}.optim_params.pt   FP32 main weights and Adam moments of the data-parallel
                                      group(s) rank r leads, gathered over the group (Megatron's
                                      ``save_parameter_state``); absent on the other ranks

        Data-parallel replicas each write their (identical) BF16 shard. Bit-exact continuation
        needs the same GPUs, parallel layout and deterministic kernels on both sides.
        """
        from megatron.core import tensor_parallel
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        rng = rng_state()
        tracker = {k: v.clone() if torch.is_tensor(v) else v
                   for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
        os.makedirs(path, exist_ok=True)
        # collective over each data-parallel group; its first rank writes
        self.optimizer.save_parameter_state(os.path.join(path, f"rank{rank}.optim_params.pt"))
        blob = {"rank": rank, "world": world, "version": self.version, "layout": self._layout(),
                "rng": rng, "rng_tracker": tracker, "model": self._cpu(self.model.state_dict()),
                "buffers": self._loose_buffers(self.model), "optimizer": self.optimizer.state_dict()}
        if self.ref_model is not None:
            ref = self.ref_model.state_dict()
            if save_ref:
                blob["ref"] = self._cpu(ref)
            else:  # the weights are the input checkpoint's; FP8 scaling state moves in forward
                blob["ref"] = self._cpu({k: v for k, v in ref.items() if k.endswith("_extra_state")})
                blob["ref_digest"] = self._weights_digest(ref)
            blob["ref_buffers"] = self._loose_buffers(self.ref_model)
        torch.save(blob, os.path.join(path, f"rank{rank}.pt"))
        if rank == 0:
            write_state_meta(path, backend="megatron", world=world, version=self.version,
                             layout=self._layout(),
                             ref=None if self.ref_model is None else ("saved" if save_ref else "rebuilt"))
        torch.distributed.barrier()

    def load_state(self, path: str) -> None:
        """Inverse of :meth:`save_state`, on a backend freshly built from the checkpoint the saved run
        started from, with the same config and layout; every rank calls it (the optimizer's
        parameter state is scattered over each data-parallel group)."""
        from megatron.core import tensor_parallel
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        meta = read_state_meta(path, "megatron", world)
        if meta["layout"] != self._layout():
            raise ValueError(f"{path} was saved with parallel layout {meta['layout']}, this learner "
                             f"has {self._layout()}: resume with the same learner.megatron sizes")
        blob = torch.load(os.path.join(path, f"rank{rank}.pt"), map_location="cpu", weights_only=False)
        if (blob["rank"], blob["world"]) != (rank, world):
            raise ValueError(f"{path}/rank{rank}.pt belongs to rank {blob['rank']} of {blob['world']}")
        self.model.load_state_dict(blob["model"], strict=True)
        self._set_loose_buffers(self.model, blob["buffers"])
        if self.ref_model is not None:
            if meta["ref"] is None:
                raise ValueError(f"{path} was saved without a reference model (loss.kl_coef was 0); "
                                 "resume with the same learner.loss.kl_coef")
            if meta["ref"] == "rebuilt" and \
                    self._weights_digest(self.ref_model.state_dict()) != blob["ref_digest"]:
                raise ValueError(f"{path} did not save the reference model, and the one this backend "
                                 "loaded differs from the saved run's: build the learner from the "
                                 "checkpoint the saved run started from")
            self.ref_model.load_state_dict(blob["ref"], strict=meta["ref"] == "saved")
            self._set_loose_buffers(self.ref_model, blob["ref_buffers"])
        # Megatron's own resume order: the state_dict allocates the optimizer's state, then the
        # parameter state (FP32 main weights, moments) fills it
        self.optimizer.load_state_dict(blob["optimizer"])
        self.optimizer.load_parameter_state(os.path.join(path, f"rank{rank}.optim_params.pt"))
        self.version = blob["version"]
        set_rng_state(blob["rng"])
        tensor_parallel.get_cuda_rng_tracker().set_states(blob["rng_tracker"])
        torch.distributed.barrier()

    # ------------------------------------------------------------------ weights out
    def named_megatron_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This stage's weights under unsharded Megatron names, gathered over TP and EP ranks.

        Every rank of the stage must iterate (the gathers are collectives).
        """
        ps, c = self.ps, self._rank_coords()
        tp_group = ps.get_tensor_model_parallel_group() if self.par.tp > 1 else None
        ep_group = ps.get_expert_model_parallel_group() if self.par.ep > 1 else None
        for name, t in self.model.state_dict().items():
            if convert.is_mcore_only(name) or t is None or not torch.is_tensor(t):
                continue
            t = t.detach()
            if tp_group is not None and convert.tp_split_dim(name) is not None:
                parts = [torch.empty_like(t) for _ in range(self.par.tp)]
                torch.distributed.all_gather(parts, t.contiguous(), group=tp_group)
                t = convert.merge_tp(name, parts)
            if ep_group is not None and ".mlp.experts." in name:
                parts = [torch.empty_like(t) for _ in range(self.par.ep)]
                torch.distributed.all_gather(parts, t.contiguous(), group=ep_group)
                for r, p in enumerate(parts):
                    yield convert.global_name(name, self.spec, c["pp"], c["pp_rank"], c["ep"], r), p
                continue
            yield convert.global_name(name, self.spec, c["pp"], c["pp_rank"], 1, 0), t

    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This stage's weights under Hugging Face names (BF16, on GPU), layer by layer, nothing
        held back. Every rank of the stage must iterate (TP / EP gathers)."""
        return convert.mcore_to_hf_iter(self.named_megatron_weights(), self.spec)

    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective over all ranks: the whole model on global rank 0, nothing elsewhere."""
        from learner.weight_sync import stream_stages_to_rank0
        return stream_stages_to_rank0(self.named_hf_weights(), self.ps.get_pipeline_model_parallel_rank(),
                                      self.par.pp, device=torch.device("cuda", torch.cuda.current_device()))

    def save_hf(self, path: str) -> None:
        """Write config, safetensors (one file per pipeline stage) and tokenizer files."""
        from safetensors.torch import save_file
        rank = torch.distributed.get_rank()
        stage = self.ps.get_pipeline_model_parallel_rank()
        world = torch.distributed.get_world_size()
        where = [None] * world
        torch.distributed.all_gather_object(where, stage)
        writer = min(r for r in range(world) if where[r] == stage)  # the stage's lowest rank writes
        tensors = {}
        for n, t in self.named_hf_weights():  # every rank iterates: the gathers are collectives
            if rank == writer:
                tensors[n] = t.contiguous().cpu()
        stages = [None] * world
        torch.distributed.all_gather_object(stages, (stage, rank, sorted(tensors)))
        writers = {st: (r, names) for st, r, names in stages if r == min(
            q for q in range(world) if where[q] == st)}
        pp = self.par.pp
        fname = "model.safetensors" if pp == 1 else f"model-{stage + 1:05d}-of-{pp:05d}.safetensors"
        if writers[stage][0] == rank:
            os.makedirs(path, exist_ok=True)
            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        if rank == 0:
            os.makedirs(path, exist_ok=True)
            for f in os.listdir(self.model_path):
                src = os.path.join(self.model_path, f)
                if os.path.isfile(src) and not f.endswith(".safetensors") and \
                        f != "model.safetensors.index.json":
                    shutil.copy(src, os.path.join(path, f))
            with open(os.path.join(self.model_path, "config.json")) as fh:
                hf_cfg = json.load(fh)
            hf_cfg["torch_dtype"] = hf_cfg["dtype"] = "bfloat16"
            if self.spec.is_moe and self.cfg.megatron.moe_router_topk:
                hf_cfg["num_experts_per_tok"] = self.cfg.megatron.moe_router_topk
            with open(os.path.join(path, "config.json"), "w") as fh:
                json.dump(hf_cfg, fh, indent=2)
            if pp > 1:
                wm = {n: f"model-{st + 1:05d}-of-{pp:05d}.safetensors"
                      for st, (_, names) in writers.items() for n in names}
                with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
                    json.dump({"metadata": {}, "weight_map": wm}, fh, indent=2)
        torch.distributed.barrier()
