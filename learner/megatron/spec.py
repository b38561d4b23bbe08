"""What the Megatron backend needs to know about a Hugging Face model, and config validation.

Plain Python (no torch, no megatron): it runs in CI. :class:`ModelSpec` is read once from a
checkpoint's ``config.json``; :func:`validate` checks a :class:`learner.config.MegatronConfig`
against it and the world size before any GPU work starts, with errors that say what to change.

Supported families (``model_type``): ``qwen2``, ``qwen3`` (dense) and ``qwen2_moe``, ``qwen3_moe``.

>>> s = ModelSpec.from_hf_config({"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64,
...     "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
...     "num_key_value_heads": 2})
>>> (s.head_dim, s.is_moe, s.qkv_bias, s.qk_norm)
(16, False, True, False)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
FP8_FORMATS = (None, "hybrid")
FP8_RECIPES = ("delayed", "current")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
"""'none' is aux-loss-free balancing (a per-expert routing bias updated from the load, DeepSeek-V3),
as :class:`learner.config.MegatronConfig` documents; ``aux_loss`` with coefficient 0 turns balancing off."""


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only Qwen-family model, as both layouts need it."""
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    """Dense MLP width (``intermediate_size``)."""
    qkv_bias: bool
    qk_norm: bool
    tie_embeddings: bool
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_position_embeddings: int = 32768
    num_experts: int = 0
    """0 for a dense model."""
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 0
    norm_topk_prob: bool = False
    """True renormalises the top-k router probabilities (Qwen3-MoE); False keeps the softmax over
    all experts (Qwen2-MoE)."""
    shared_expert_size: int = 0
    """Width of the always-on shared expert (Qwen2-MoE), 0 if none; it has a sigmoid gate."""
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelSpec":
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"model_type {family!r} is not supported by the megatron backend; "
                             f"supported: {', '.join(FAMILIES)}")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        head_dim = cfg.get("head_dim") or hidden // heads
        moe = family.endswith("_moe")
        if moe:
            sparse_step = cfg.get("decoder_sparse_step", 1)
            if sparse_step != 1 or cfg.get("mlp_only_layers"):
                raise ValueError(f"{family}: only checkpoints whose every layer is MoE are supported "
                                 f"(decoder_sparse_step=1, mlp_only_layers=[]); got "
                                 f"decoder_sparse_step={sparse_step}, "
                                 f"mlp_only_layers={cfg.get('mlp_only_layers')}")
        rope = cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            ffn_hidden_size=cfg.get("intermediate_size", 0),
            qkv_bias=family in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            num_experts=cfg.get("num_experts", 0) if moe else 0,
            moe_ffn_hidden_size=cfg.get("moe_intermediate_size", 0) if moe else 0,
            moe_topk=cfg.get("num_experts_per_tok", 0) if moe else 0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)) if moe else False,
            shared_expert_size=cfg.get("shared_expert_intermediate_size", 0) if moe else 0,
            hf_config=dict(cfg),
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelSpec":
        with open(os.path.join(path, "config.json")) as f:
            return cls.from_hf_config(json.load(f))


@dataclass(frozen=True)
class Parallel:
    """Sizes of the parallel dimensions; ``dp`` is derived from the world size."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1


def validate(mcfg, spec: ModelSpec, world_size: int, micro_batch_size: int | None = None,
             where: str = "learner.megatron") -> Parallel:
    """Check a :class:`learner.config.MegatronConfig` against the model and the world size.

    Returns the resolved :class:`Parallel` sizes. Raises ``ValueError`` naming the field to change.
    Experts are not tensor-parallel (expert tensor parallel size 1); ``expert_parallel`` must divide
    ``tensor_parallel * data_parallel`` (Megatron-core folds expert parallelism into those ranks).
    """
    tp, pp, ep = mcfg.tensor_parallel, mcfg.pipeline_parallel, mcfg.expert_parallel
    for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("expert_parallel", ep)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}.{name} must be an integer >= 1, got {v!r}")
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not divisible by {where}.tensor_parallel * "
                         f"{where}.pipeline_parallel = {tp * pp}; change them or the number of GPUs")
    dp = world_size // (tp * pp)
    if (tp * dp) % ep:
        raise ValueError(f"{where}.expert_parallel={ep} must divide tensor_parallel * data_parallel "
                         f"= {tp * dp}")
    if ep > 1 and not spec.is_moe:
        raise ValueError(f"{where}.expert_parallel={ep} needs a MoE model; {spec.family} is dense")
    if spec.is_moe and spec.num_experts % ep:
        raise ValueError(f"{where}.expert_parallel={ep} must divide the number of experts "
                         f"({spec.num_experts})")
    if spec.num_heads % tp or spec.num_kv_heads % tp:
        raise ValueError(f"{where}.tensor_parallel={tp} must divide the attention heads "
                         f"({spec.num_heads}) and key/value heads ({spec.num_kv_heads})")
    if spec.vocab_size % tp:
        raise ValueError(f"{where}.tensor_parallel={tp} must divide the vocabulary ({spec.vocab_size}); "
                         "padding the vocabulary would change the softmax")
    if spec.num_layers % pp:
        raise ValueError(f"{where}.pipeline_parallel={pp} must divide num_hidden_layers "
                         f"({spec.num_layers})")
    if pp > 1 and spec.tie_embeddings:
        raise ValueError(f"{where}.pipeline_parallel > 1 with tied embeddings is not supported")
    if mcfg.fp8 not in FP8_FORMATS:
        raise ValueError(f"{where}.fp8 must be null (BF16) or 'hybrid', got {mcfg.fp8!r}")
    if mcfg.fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"{where}.fp8_recipe must be one of {', '.join(FP8_RECIPES)}, "
                         f"got {mcfg.fp8_recipe!r}")
    if mcfg.moe_router_load_balancing not in LOAD_BALANCING:
        raise ValueError(f"{where}.moe_router_load_balancing must be one of "
                         f"{', '.join(LOAD_BALANCING)}, got {mcfg.moe_router_load_balancing!r}")
    if mcfg.moe_aux_loss_coef < 0:
        raise ValueError(f"{where}.moe_aux_loss_coef must be >= 0, got {mcfg.moe_aux_loss_coef}")
    if mcfg.moe_router_topk is not None:
        if not spec.is_moe:
            raise ValueError(f"{where}.moe_router_topk is set but {spec.family} is dense")
        if not 1 <= mcfg.moe_router_topk <= spec.num_experts:
            raise ValueError(f"{where}.moe_router_topk must be in [1, {spec.num_experts}], "
                             f"got {mcfg.moe_router_topk}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"learner.micro_batch_size must be >= 1, got {micro_batch_size}")
    return Parallel(tp=tp, pp=pp, ep=ep, dp=dp)
