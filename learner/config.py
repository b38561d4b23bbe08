"""Typed learner configuration, validated once at the edge (before any actor starts)."""
from __future__ import annotations

from dataclasses import dataclass, field

BACKENDS = ("torch", "megatron")
# how token losses become one number (learner.losses.aggregate); kept here so that validating a
# config never imports torch (the driver imports it beside Ray's start, cluster.controller)
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


@dataclass
class LossConfig:
    clip_low: float = 0.2
    """Lower PPO clip: the ratio is clamped at ``1 - clip_low``."""
    clip_high: float = 0.28
    """Upper PPO clip: ``1 + clip_high`` (DAPO's clip-higher; set equal to clip_low for the paper)."""
    kl_coef: float = 0.0
    """Weight of the k3 KL penalty to the frozen reference; 0 loads no reference model."""
    scale_adv_by_std: bool = True
    """Divide advantages by the group std (GRPO); False is Dr.GRPO."""
    aggregation: str = "seq_mean_token_mean"
    """How token losses become one number: token_mean | seq_mean_token_mean | seq_mean_token_sum_norm."""
    old_logprobs: str = "learner"
    """What the PPO ratio is taken against: ``rollout`` (engine logprobs) or ``learner`` (recomputed
    before the update, with truncated importance weights against the rollout logprobs)."""
    tis_cap: float = 2.0
    """Cap of the truncated importance weight (``old_logprobs: learner`` only)."""
    norm_len: int = 0
    """Constant divisor of ``seq_mean_token_sum_norm``; 0 means the rollout's max_tokens."""
    clip_ratio_c: float = 3.0
    """Dual-clip bound for negative advantages (as verl): a token's loss is at most
    ``-advantage * clip_ratio_c``; 0 turns it off."""

    def validate(self, where: str = "learner.loss") -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"{where}.clip_low must be in [0, 1), got {self.clip_low}")
        if self.clip_high < 0:
            raise ValueError(f"{where}.clip_high must be >= 0, got {self.clip_high}")
        if self.kl_coef < 0:
            raise ValueError(f"{where}.kl_coef must be >= 0, got {self.kl_coef}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"{where}.aggregation must be one of {', '.join(AGGREGATIONS)}, "
                             f"got {self.aggregation!r}")
        if self.old_logprobs not in ("rollout", "learner"):
            raise ValueError(f"{where}.old_logprobs must be 'rollout' or 'learner', "
                             f"got {self.old_logprobs!r}")
        if self.clip_ratio_c and self.clip_ratio_c <= 1:
            raise ValueError(f"{where}.clip_ratio_c must be > 1 (or 0: off), got {self.clip_ratio_c}")
        if self.tis_cap < 1:
            raise ValueError(f"{where}.tis_cap must be >= 1, got {self.tis_cap}")


@dataclass
class MegatronConfig:
    """Megatron-core backend settings (GPU only)."""
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    expert_parallel: int = 1
    fp8: str | None = None
    """None (BF16) or 'hybrid' (E4M3 forward, E5M2 backward) through Transformer Engine."""
    fp8_recipe: str = "delayed"
    """'delayed' or 'current' scaling."""
    moe_router_topk: int | None = None
    """Override the checkpoint's experts per token."""
    moe_aux_loss_coef: float = 0.001
    moe_router_load_balancing: str = "aux_loss"
    """'aux_loss' or 'none' (aux-loss-free, bias-based: 'seq_aux_loss' / expert bias per mcore)."""


@dataclass
class LearnerConfig:
    backend: str = "torch"
    """'torch' (Hugging Face model; CPU or GPU) or 'megatron' (Megatron-core + TE, GPU only)."""
    num_actors: int = 1
    """Data-parallel learner actors (gloo on CPU, NCCL on GPU)."""
    gpus_per_actor: float = 0.0
    """GPUs per learner actor; 0 trains on CPU."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    micro_batch_size: int = 64
    """Sequences per forward/backward; gradients accumulate over micro-batches."""
    mini_batches: int = 1
    """Optimizer steps per GRPO batch (PPO-style: the batch is split in this many mini-batches that
    share the old logprobs taken before the first, so the clip acts from the second one on)."""
    dtype: str = "float32"
    """Training dtype of the parameters: float32 | bfloat16."""
    compute_dtype: str = "float32"
    """Dtype of the torch backend's forward and backward: float32 | bfloat16 | auto. ``bfloat16``
    over float32 parameters is mixed precision with master weights: a bf16 working copy of the
    model runs forward and backward, its gradients are accumulated in float32, and AdamW steps the
    float32 parameters (what the engines receive and checkpoints hold); the frozen reference is
    kept in bf16. ``auto`` is bfloat16 where the device multiplies bf16 natively (a CUDA GPU with
    bf16, a CPU with AMX or AVX512-BF16: :func:`learner.precision.native_bf16`), else float32.
    With ``dtype: bfloat16`` everything is bf16 already. The Megatron backend ignores it (its
    ``dtype: bfloat16`` is mixed precision already)."""
    seed: int = 0
    share_prompts: bool = True
    """Run each distinct prompt of a batch once, with its KV cache repeated to the samples of its
    group, in every learner forward (torch backend; :mod:`learner.prefix`); ``false``: every row
    runs prompt and response in full."""
    reference: str = "learner"
    """Where the frozen KL reference (``loss.kl_coef > 0``) computes its logprobs (see
    :mod:`learner.reference`): ``learner``, in each learner actor before the update; ``pool``, in
    reference actors of their own (``reference_actors``, ``run.reference_cpus``) that score each
    training request while a reward actor does, so the learner's update does not wait for it
    (torch backend only)."""
    reference_actors: int = 1
    """Reference actors with ``reference: pool`` (used round-robin)."""
    threads: int = 0
    """CPU threads of each learner actor's torch: N, or 0 (auto): every core the actor may run on
    when nothing else computes meanwhile (an SFT stage, or GRPO with ``algo.max_staleness: 0``,
    where the engines idle while the learner trains) and one learner actor per run; otherwise
    the actor's ``run.learner_cpus`` (Ray's setting), so an asynchronous learner does not fight
    the engines for cores (on 2 cores that made generation 1.6x slower)."""
    loss: LossConfig = field(default_factory=LossConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)

    def validate(self, where: str = "learner") -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"{where}.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.num_actors < 1:
            raise ValueError(f"{where}.num_actors must be >= 1, got {self.num_actors}")
        if self.lr <= 0:
            raise ValueError(f"{where}.lr must be > 0, got {self.lr}")
        if self.threads < 0:
            raise ValueError(f"{where}.threads must be >= 0 (0: auto), got {self.threads}")
        if self.mini_batches < 1:
            raise ValueError(f"{where}.mini_batches must be >= 1, got {self.mini_batches}")
        if self.micro_batch_size < 1:
            raise ValueError(f"{where}.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"{where}.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.compute_dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"{where}.compute_dtype must be float32, bfloat16 or auto, "
                             f"got {self.compute_dtype!r}")
        if self.reference not in ("learner", "pool"):
            raise ValueError(f"{where}.reference must be learner or pool, got {self.reference!r}")
        if self.reference_actors < 1:
            raise ValueError(f"{where}.reference_actors must be >= 1, got {self.reference_actors}")
        if self.backend == "megatron" and self.gpus_per_actor <= 0:
            raise ValueError(f"{where}.backend=megatron needs {where}.gpus_per_actor > 0 "
                             "(Megatron-core's forward pass needs CUDA); use backend=torch on CPU")
        if self.reference == "pool" and self.backend == "megatron":
            raise ValueError(f"{where}.reference=pool is for the torch backend; the Megatron "
                             "backend computes its reference itself (use reference=learner)")
        self.loss.validate(f"{where}.loss")
