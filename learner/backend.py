"""The interface every learner backend implements (torch now, Megatron-core on GPU).

A backend is plain Python: it owns a model, an optimizer and (optionally) a frozen reference model,
and knows nothing about Ray, rollout or the controller. ``actors/learner.py`` wraps one per process.
Losses come from :mod:`learner.losses`, so every backend trains the same objective.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Protocol

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

    def save_state(self, path: str, save_ref: bool = True) -> None:
        """Collective: every rank calls it. Writes what an exact resume needs into the directory
        ``path`` (created): weights and buffers in their own dtype, optimizer state, the frozen
        reference (``save_ref=False``: only a fingerprint, and :meth:`load_state` checks that the
        freshly built reference matches it), RNG states, ``version`` and the backend's counters.
        Files are written in place; the caller makes the directory appear atomically (it passes
        a temporary one and renames it)."""

    def load_state(self, path: str) -> None:
        """Collective: every rank calls it, on a backend freshly built from the checkpoint the
        saved run started from, with the same config and number of ranks. After it, training
        continues bit for bit as the saved run would have (same hardware and thread count)."""


# ---- the state format every backend writes (save_state / load_state) --------------------------
STATE_FORMAT = 1
META = "meta.json"


def rng_state() -> dict:
    """This process's RNG states: torch's CPU generator, every CUDA device's (once CUDA is
    initialised; before that nothing has drawn from them), Python's ``random`` and numpy's global
    generator, in types ``torch.load(weights_only=True)`` reads back."""
    import random

    import numpy as np

    kind, key, pos, has_gauss, gauss = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    if "cuda" in state:
        if not torch.cuda.is_available():
            raise RuntimeError("the saved state holds CUDA RNG states but CUDA is not available here")
        torch.cuda.set_rng_state_all(state["cuda"])


def tensor_digest(tensors: Iterable[torch.Tensor], chunk: int = 1 << 22) -> int:
    """A fingerprint of the bits of ``tensors`` (on their device; ``chunk`` elements at a time): the
    position-weighted sum of each tensor's machine words, mixed over tensors. Equal tensors give
    equal digests; tensors that differ in any bit give different ones but for a ~2^-61 chance."""
    words = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
    mod = (1 << 61) - 1
    total = 0
    for t in tensors:
        flat = t.detach().contiguous().view(-1)
        w = flat.view(words[flat.element_size()]) if flat.numel() else flat
        s = flat.numel()
        for lo in range(0, flat.numel(), chunk):
            part = w[lo: lo + chunk].to(torch.int64)
            pos = torch.arange(lo + 1, lo + 1 + part.numel(), device=part.device, dtype=torch.int64)
            s = (s * 1_000_003 + int((part * pos).sum()) + int(part.sum())) % mod  # int64 wraps: fine
        total = (total * 1_000_033 + s + 1) % mod
    return total


def write_state_meta(path: str, **fields) -> None:
    """``meta.json`` of a saved state: its format, the backend and number of ranks, and ``fields``."""
    with open(os.path.join(path, META), "w") as f:
        json.dump({"format": STATE_FORMAT, **fields}, f, indent=1)


def read_state_meta(path: str, backend: str, world: int) -> dict:
    """``meta.json`` of the state in ``path``, checked against the backend loading it."""
    file = os.path.join(path, META)
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} is missing: {path} is not a complete learner state")
    with open(file) as f:
        meta = json.load(f)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: learner state format {meta.get('format')}, this code reads "
                         f"{STATE_FORMAT}")
    if meta.get("backend") != backend:
        raise ValueError(f"{path} holds a {meta.get('backend')!r} learner state; learner.backend is "
                         f"{backend!r}: resume with the backend that saved it")
    if meta.get("world") != world:
        raise ValueError(f"{path} was saved by {meta.get('world')} learner ranks, this learner has "
                         f"{world}: resume with the same learner.num_actors (and parallel layout)")
    return meta
