"""The learner's view of a batch: padded tensors built from rollout samples.

Token ``i`` of a sequence is predicted from positions ``< i``; ``logprobs[:, i]`` is the logprob of
``input_ids[:, i]`` and position 0 carries 0. ``response_mask`` marks the response tokens (the ones
that are trained on). Sequences are right-padded with ``pad_id``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class TrainBatch:
    input_ids: torch.Tensor          # [B, L] long
    attention_mask: torch.Tensor     # [B, L] long, 1 on real tokens
    response_mask: torch.Tensor      # [B, L] float, 1 on response tokens
    rollout_logprobs: torch.Tensor   # [B, L] float, engine logprobs of response tokens, else 0
    advantages: torch.Tensor         # [B] float
    ref_logprobs: torch.Tensor | None = None
    """[B, L] float, the KL reference's logprobs of response tokens, else 0, when the rollout
    reference actors computed them (``learner.reference: pool``); ``None``: the learner computes them."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn) -> "TrainBatch":
        return TrainBatch(*(fn(t) for t in (self.input_ids, self.attention_mask, self.response_mask,
                                            self.rollout_logprobs, self.advantages)),
                          ref_logprobs=None if self.ref_logprobs is None else fn(self.ref_logprobs))

    def slice(self, start: int, end: int) -> "TrainBatch":
        return self._map(lambda t: t[start:end])

    def to(self, device) -> "TrainBatch":
        return self._map(lambda t: t.to(device))

    def shard(self, rank: int, world: int) -> "TrainBatch":
        """Contiguous shard ``rank`` of ``world`` (data parallel); sizes differ by at most one."""
        n = len(self)
        per, extra = divmod(n, world)
        start = rank * per + min(rank, extra)
        return self.slice(start, start + per + (1 if rank < extra else 0))


def collate(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
            response_logprobs: Sequence[Sequence[float]] | None, advantages: Sequence[float] | None,
            pad_id: int, ref_logprobs: Sequence[Sequence[float]] | None = None) -> TrainBatch:
    """Pad ``prompt + response`` sequences into a :class:`TrainBatch`; ``ref_logprobs`` (one per
    response token, like ``response_logprobs``) fills :attr:`TrainBatch.ref_logprobs`."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids differ in length")
    n = len(prompt_ids)
    max_len = max((len(p) + len(r) for p, r in zip(prompt_ids, response_ids)), default=1)
    ids = torch.full((n, max_len), pad_id, dtype=torch.long)
    attn = torch.zeros((n, max_len), dtype=torch.long)
    rmask = torch.zeros((n, max_len), dtype=torch.float32)
    rlp = torch.zeros((n, max_len), dtype=torch.float32)
    ref = torch.zeros((n, max_len), dtype=torch.float32) if ref_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        lp, lr = len(p), len(r)
        ids[i, :lp + lr] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, :lp + lr] = 1
        rmask[i, lp:lp + lr] = 1.0
        for name, src, dst in (("logprobs", response_logprobs, rlp), ("reference logprobs", ref_logprobs, ref)):
            if src is not None:
                if len(src[i]) != lr:
                    raise ValueError(f"sample {i}: {len(src[i])} {name} for {lr} tokens")
                dst[i, lp:lp + lr] = torch.tensor(src[i], dtype=torch.float32)
    adv = torch.tensor(list(advantages) if advantages is not None else [0.0] * n, dtype=torch.float32)
    return TrainBatch(ids, attn, rmask, rlp, adv, ref)
