"""The frozen KL reference: the stage's input checkpoint, loaded once and never trained, giving the
response logprobs of a batch for GRPO's k3 KL penalty (``learner.loss.kl_coef > 0``).

Where it runs is ``learner.reference``:

- ``learner`` (the default): the torch learner holds it and runs it over each batch before the
  update, on the learner's critical path.
- ``pool``: reference actors of their own (``actors.reference``) score each training request
  while a reward actor does; the samples carry the result (``Sample.ref_logprobs``) and the
  learner only reads it. The reference forward then overlaps the learner's update of the
  previous batch, the way OpenRLHF runs its reference models apart from the actor. On the demo's
  2-core job that takes ~0.04 s a step off the learner (bench/README.md), for one more process
  (and, on a GPU, the model's memory wherever the reference actors are placed).

Both compute the same numbers: the same checkpoint, the same dtype (``learner.dtype`` /
``learner.compute_dtype`` resolved on the device it runs on), the same shared-prompt forward
(``learner.share_prompts``) and temperature; only the batch composition differs (a request's rows
instead of the learner's micro-batch), which moves a logprob by float round-off at most.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from learner.batch import collate
from learner.precision import cast_parameters, resolve_compute_dtype
from learner.prefix import ResponseLogprobs


@dataclass(frozen=True)
class ReferenceSpec:
    """How to build a :class:`Reference`: the learner's settings that change its numbers."""
    dtype: str = "float32"
    """``learner.dtype``: the dtype the checkpoint is loaded in."""
    compute_dtype: str = "float32"
    """``learner.compute_dtype``, resolved where the reference runs (ignored when ``dtype`` is
    bfloat16, which is bf16 throughout)."""
    share_prompts: bool = True
    micro_batch_size: int = 64
    temperature: float = 1.0

    @classmethod
    def of(cls, cfg, temperature: float) -> "ReferenceSpec":
        """The spec of a :class:`learner.config.LearnerConfig`'s reference."""
        return cls(cfg.dtype, cfg.compute_dtype, cfg.share_prompts, cfg.micro_batch_size, temperature)


class Reference:
    """A frozen causal LM that gives response logprobs; plain Python (no Ray)."""

    def __init__(self, model_path: str, spec: ReferenceSpec, device: str | torch.device | None = None):
        from transformers import AutoModelForCausalLM

        self.spec = spec
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, spec.dtype)
        self.dtype = dtype if dtype == torch.bfloat16 else resolve_compute_dtype(spec.compute_dtype,
                                                                                 self.device)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        # parameters cast, buffers (RoPE frequencies) kept in float32; SDPA kept: no backward here
        self.model = cast_parameters(model, self.dtype).eval().requires_grad_(False)
        self._fwd = ResponseLogprobs(spec.share_prompts, spec.temperature)

    def logprobs(self, batch) -> torch.Tensor:
        """``[B, L]`` logprobs of a :class:`learner.batch.TrainBatch` (0 off the response), on CPU."""
        return self._fwd.batch(self.model, batch, self.spec.micro_batch_size, self.device)

    def sample_logprobs(self, prompt_ids: Sequence[Sequence[int]],
                        response_ids: Sequence[Sequence[int]]) -> tuple[list[list[float]], float]:
        """Each sample's reference logprob per response token, and the seconds it took. The rows
        are right-padded with token 0, which no real position attends to (causal and masked)."""
        t0 = time.perf_counter()
        batch = collate(prompt_ids, response_ids, None, None, pad_id=0)
        lp = self.logprobs(batch)
        out = []
        for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
            out.append(lp[i, len(p):len(p) + len(r)].tolist())
        return out, time.perf_counter() - t0
