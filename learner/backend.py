"""The interface every learner backend implements (torch now, Megatron-core on GPU).

A backend is plain Python: it owns a model, an optimizer and (optionally) a frozen reference model,
and knows nothing about Ray, rollout or the controller. ``actors/learner.py`` wraps one per process.
Losses come from :mod:`learner.losses`, so every backend trains the same objective.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch

from learner.batch import TrainBatch


class LearnerBackend(Protocol):
    version: int  # weight version: 0 after load, +1 per train_grpo / train_sft call
    dp_rank: int  # this rank's data-parallel replica and the number of replicas: the rows of a
    dp_size: int  # batch it trains on are ``batch.shard(dp_rank, dp_size)``

    def train_grpo(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO update on ``batch`` (this rank's shard); returns diagnostics."""

    def train_sft(self, batch: TrainBatch) -> dict[str, float]:
        """One SFT update (NLL of the response tokens); returns diagnostics."""

    def logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """``[B, L]`` logprobs of ``batch.input_ids`` under the current weights (no grad)."""

    def named_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's weights under Hugging Face names (gathered over tensor/expert-parallel ranks;
        one pipeline stage's share). Every rank of a model-parallel group must iterate it."""

    def export_hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Collective: every rank calls it and iterates it to the end; rank 0 gets the full model
        under Hugging Face names (what weight sync sends), every other rank an empty stream."""

    def save_hf(self, path: str) -> None:
        """Collective: every rank calls it. Writes a Hugging Face checkpoint (config, safetensors,
        tokenizer) loadable by transformers and vLLM."""
