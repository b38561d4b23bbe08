"""GRPO and SFT losses as small pure tensor functions, shared by every learner backend.

GRPO as in DeepSeekMath (Shao et al. 2024) and DeepSeek-R1: for each prompt sample G completions,
advantage = (reward - group mean) / group std, a PPO-style clipped ratio, and an optional KL penalty
to a frozen reference policy with the k3 estimator.

Where this departs from the paper, and why:
1. Clipping is asymmetric (``clip_low`` / ``clip_high``, as DAPO's "clip-higher"); equal values give
   the paper's symmetric clip.
2. Std scaling of the advantage is optional (``scale_by_std=False`` is Dr.GRPO's unbiased variant).
3. Loss aggregation is selectable: ``"seq_mean_token_mean"`` is the paper's (mean over tokens of each
   sequence, then over sequences); ``"token_mean"`` averages over all tokens of the batch (DAPO);
   ``"seq_mean_token_sum_norm"`` sums tokens and divides by a constant (Dr.GRPO).
4. Samples come from vLLM, possibly a few weight versions behind the learner (asynchronous rollout).
   The PPO ratio is taken against ``old_logprobs``; the learner passes either the rollout engine's
   logprobs or its own recomputed ones, and in the second case multiplies each token's loss by the
   truncated importance weight ``min(exp(old - rollout), tis_cap)`` (Yao et al. 2025, "truncated
   importance sampling"), which corrects both the engine/learner numerical mismatch and staleness.
5. The KL term is added to the loss (as in the paper), not folded into the reward.
6. The per-token k3 value is capped at ``KL_CLAMP`` = 10 (as verl does).
7. Dual-clip (Ye et al. 2020, as verl's ``clip_ratio_c``): for a negative advantage the token loss
   is also capped at ``-advantage * clip_ratio_c``, so a stale sample whose ratio has grown large
   cannot produce an unbounded push (``clip_ratio_c=0`` turns it off).

Shapes: ``B`` sequences, ``T`` response tokens (right-padded); ``mask`` is 1.0 on real response
tokens and 0.0 on padding. All functions are differentiable where it makes sense and never modify
their inputs.
"""
from __future__ import annotations

import torch

from learner.config import AGGREGATIONS

KL_CLAMP = 10.0


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6,
    std_tol: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages.

    Args:
        rewards: ``[B]`` scalar reward per completion, groups contiguous (``B = n_groups * G``).
        group_size: ``G``, completions per prompt.
        scale_by_std: divide by the group's (unbiased=False) std plus ``eps``.
        std_tol: a group whose reward std is at most ``std_tol * max(1, max |reward|)`` is a group
            of equal rewards: every one of its advantages is exactly 0, with or without std
            scaling. Computed in float64: in float32, twelve rewards of 1.1 have a round-off std
            of ~1e-7 and a mean off by one ulp, which ``/ (std + eps)`` turned into an advantage of
            -0.1 on every sample of a solved group, pushing correct answers down.

    Returns:
        ``[B]`` float32 advantages.

    >>> group_advantages(torch.tensor([1., 0., 0., 1.]), 4, scale_by_std=False).tolist()
    [0.5, -0.5, -0.5, 0.5]
    >>> group_advantages(torch.full((12,), 1.1), 12).tolist() == [0.0] * 12
    True
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} entries, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.double().view(-1, group_size)
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, unbiased=False, keepdim=True)
    adv = r - mean
    if scale_by_std:
        adv = adv / (std + eps)
    adv = torch.where(_equal_rewards(r, std, std_tol), torch.zeros_like(adv), adv)
    return adv.reshape(-1).float()


def _equal_rewards(r: torch.Tensor, std: torch.Tensor, std_tol: float) -> torch.Tensor:
    """``[n_groups, 1]`` True where a group's rewards are equal up to round-off (``std_tol``)."""
    return std <= std_tol * r.abs().amax(dim=1, keepdim=True).clamp_min(1.0)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, std_tol: float = 1e-6) -> int:
    """How many groups have equal rewards (advantage 0 for all their samples: no learning signal)."""
    r = rewards.double().view(-1, group_size)
    return int(_equal_rewards(r, r.std(dim=1, unbiased=False, keepdim=True), std_tol).sum())


def aggregate(loss_tok: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: int | None = None
              ) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (see module docstring, item 3)."""
    mask = mask.to(loss_tok.dtype)
    if mode == "token_mean":
        return (loss_tok * mask).sum() / mask.sum().clamp_min(1.0)
    if mode == "seq_mean_token_mean":
        per_seq = (loss_tok * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return per_seq.mean()
    if mode == "seq_mean_token_sum_norm":
        denom = float(norm_len if norm_len is not None else loss_tok.shape[1])
        return ((loss_tok * mask).sum(1) / denom).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {', '.join(AGGREGATIONS)}")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020): ``exp(r) - r - 1``, ``r = ref - logp``.

    Non-negative, unbiased, and exactly 0 where the logprobs are equal. Each token's value is capped
    at ``KL_CLAMP`` (module docstring, item 6): ``exp(r)`` explodes on a token the reference deems
    near-impossible, and one such token would otherwise dominate the batch.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=KL_CLAMP)


def truncated_is_weight(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float
                        ) -> torch.Tensor:
    """``min(pi_old / pi_rollout, cap)`` per token, detached (module docstring, item 4)."""
    return torch.exp((old_logprobs - rollout_logprobs).clamp(max=20.0)).clamp(max=cap).detach()


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    is_weights: torch.Tensor | None = None,
    aggregation: str = "seq_mean_token_mean",
    norm_len: int | None = None,
    clip_ratio_c: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss with optional k3 KL penalty.

    Args:
        logprobs: ``[B, T]`` current policy logprobs of the sampled tokens (requires grad).
        old_logprobs: ``[B, T]`` logprobs of the policy the ratio is taken against.
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]``.
        mask: ``[B, T]`` 1.0 on response tokens.
        ref_logprobs: ``[B, T]`` frozen reference logprobs, needed when ``kl_coef > 0``.
        is_weights: ``[B, T]`` optional per-token importance weights (detached).
        clip_ratio_c: dual-clip bound (> 1) for negative advantages; 0 is off (module doc, item 7).

    Returns:
        ``(loss, stats)``; stats has ``pg_loss``, ``kl``, ``clip_frac``, ``ratio_mean`` (masked means).

    At ratio 1 the loss is ``-mean(advantage)``:

    >>> lp = torch.zeros(2, 3); m = torch.ones(2, 3)
    >>> round(grpo_loss(lp, lp, torch.tensor([1., -3.]), m)[0].item(), 4)
    1.0
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantages = advantages.to(logprobs.dtype)
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_tok = -torch.minimum(ratio * advantages, clipped * advantages)
    if clip_ratio_c:
        dual = torch.minimum(pg_tok, -advantages * clip_ratio_c)
        pg_tok = torch.where(advantages < 0, dual, pg_tok)
    if is_weights is not None:
        pg_tok = pg_tok * is_weights
    loss_tok = pg_tok
    fmask = mask.to(logprobs.dtype)
    n = fmask.sum().clamp_min(1.0)
    kl_mean = 0.0
    if ref_logprobs is not None:
        kl_tok = kl_k3(logprobs, ref_logprobs)
        kl_mean = float((kl_tok.detach() * fmask).sum() / n)
        if kl_coef:
            loss_tok = loss_tok + kl_coef * kl_tok
    elif kl_coef:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    loss = aggregate(loss_tok, fmask, aggregation, norm_len)
    with torch.no_grad():
        is_clipped = ((ratio * advantages) > (clipped * advantages)).to(fmask.dtype)
        stats = {
            "pg_loss": float(aggregate(pg_tok.detach(), fmask, aggregation, norm_len)),
            "kl": kl_mean,
            "clip_frac": float((is_clipped * fmask).sum() / n),
            "ratio_mean": float((ratio.detach() * fmask).sum() / n),
        }
    return loss, stats


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the target tokens, averaged over all target tokens: ``[B, T] -> []``."""
    fmask = mask.to(logprobs.dtype)
    return -(logprobs * fmask).sum() / fmask.sum().clamp_min(1.0)


def token_entropy(logits: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy (nats) of each ``[..., V]`` distribution, no grad: ``[..., V] -> [...]``.

    ``group``: the logits' last dimension is split over this process group's ranks (Megatron's
    vocab-parallel output layer); three all-reduces (max, sum of exp, sum of exp * logit) give
    every rank the full-vocabulary entropy, ``log Z - E_p[z]``, without gathering the logits.
    """
    import torch.distributed as dist
    with torch.no_grad():
        z = logits.float()
        m = z.max(dim=-1, keepdim=True).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z = z - m
        e = z.exp()
        sums = torch.stack([e.sum(-1), (e * z).sum(-1)])
        if group is not None:
            dist.all_reduce(sums, group=group)
        return sums[0].log() - sums[1] / sums[0]


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor, group=None) -> float:
    """Mean entropy (nats) of the ``[B, T, V]`` distributions over the masked positions
    (``group``: vocab-parallel logits, see :func:`token_entropy`)."""
    ent = token_entropy(logits, group)
    fmask = mask.to(ent.dtype)
    return float((ent * fmask).sum() / fmask.sum().clamp_min(1.0))
