"""Optional learned reward: a Hugging Face sequence-classification model scores (prompt, response).

Used in R1's final RL stage beside the rule rewards. Plain class, no Ray; runs in the scorer's own
process (not in the killable workers: a model is too big to load per worker and does not hang).

- ``RewardModelScorer(model, tokenizer)``: any ``*ForSequenceClassification`` model. With one
  label the score is the logit; with several, ``label`` picks the column. ``sigmoid=True`` squashes
  it to (0, 1) so it composes with 0/1 rule rewards.
- ``RewardModelScorer.from_pretrained(path)`` loads both from a local directory (no downloads are
  attempted by this module; pass a path).
- Text fed to the model: ``template.format(prompt=..., response=...)``, truncated to ``max_length``
  tokens from the left (the end of the response is what matters most).

Verifier 'reward_model' reads ``config.options["reward_model"]``: ``path`` (required), ``batch_size``
(8), ``max_length`` (1024), ``device`` ('cpu'), ``sigmoid`` (True), ``label`` (0), ``template``.
"""
from __future__ import annotations

import inspect

from rewards.config import RewardConfig
from rewards.registry import Verdict
from rewards.types import RewardInput


class RewardModelScorer:
    def __init__(self, model, tokenizer, *, device: str = "cpu", batch_size: int = 8, max_length: int = 1024,
                 sigmoid: bool = True, label: int = 0, template: str = "{prompt}{response}"):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.sigmoid = sigmoid
        self.label = label
        self.template = template
        if getattr(self.tokenizer, "pad_token", None) is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> "RewardModelScorer":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        return cls(model, tok, **kw)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """One float per (prompt, response), same order."""
        import torch
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                if "token_type_ids" in enc and "token_type_ids" not in inspect.signature(self.model.forward).parameters:
                    del enc["token_type_ids"]
                logits = self.model(**enc).logits.float()
                col = logits[:, self.label] if logits.shape[-1] > 1 else logits[:, 0]
                if self.sigmoid:
                    col = torch.sigmoid(col)
                out.extend(col.cpu().tolist())
        return out


class RewardModelVerifier:
    """Verifier 'reward_model': loads the model on first use (in the scorer's process)."""

    def __init__(self, config: RewardConfig):
        self.opts = dict(config.options.get("reward_model", {}))
        if "path" not in self.opts and "scorer" not in self.opts:
            raise ValueError("reward_model needs options['reward_model']['path'] (a local model directory)")
        self._scorer: RewardModelScorer | None = self.opts.pop("scorer", None)

    @property
    def scorer(self) -> RewardModelScorer:
        if self._scorer is None:
            opts = dict(self.opts)
            path = opts.pop("path")
            self._scorer = RewardModelScorer.from_pretrained(path, **opts)
        return self._scorer

    def __call__(self, inputs: list[RewardInput], ctx) -> list[Verdict]:
        ok = [i for i, x in enumerate(inputs) if isinstance(x.response, str)]
        out = [Verdict(0.0, "bad_response_type") for _ in inputs]
        scores = self.scorer.score([inputs[i].prompt or "" for i in ok], [inputs[i].response for i in ok])
        ctx.count("reward_model_scored", len(ok))
        for i, s in zip(ok, scores):
            out[i] = Verdict(float(s), "ok", {"reward_model": float(s)})
        return out
