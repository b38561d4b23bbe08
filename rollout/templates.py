"""Prompt templates. The R1-Zero template is the default for math tasks.

A template turns a question into the text the model continues. Names are looked up in
:data:`TEMPLATES`; an unknown name raises and lists the known ones.
"""
from __future__ import annotations

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> "
    "answer here </answer>. User: {question}. Assistant: <think>"
)
"""DeepSeek-R1 paper, Table 1; the completion starts inside the think block."""

R1_ZERO_COMPACT = "User: {question} Assistant: <think>"
"""R1-Zero's conversation and tag format without the instruction paragraph. For the built-in
character-level tiny model, which cannot read instructions: the paragraph would be ~400 of every
sequence's ~430 tokens, i.e. ~15x the learner's work for nothing."""

TEMPLATES = {
    "r1_zero": R1_ZERO,
    "r1_zero_compact": R1_ZERO_COMPACT,
    "plain": "{question}",
    "qa": "Question: {question}\nAnswer:",
}


def render(template: str, question: str, tokenizer=None) -> str:
    """The text the model continues. ``tokenizer`` is for templates built from the tokenizer's own
    chat template (none yet in this version; the argument is accepted everywhere already)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[template].format(question=question)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, with the BOS token where the tokenizer's model expects one
    (``add_bos_token``, e.g. Llama) and not twice; templates are plain text, so no other special
    token is added. The engine, the SFT stage and length checks all encode prompts this way."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids = [bos] + list(ids)
    return list(ids)


def encode_target(tokenizer, text: str) -> list[int]:
    """Token ids of an SFT target completion, ending with the tokenizer's EOS (when it has one),
    so the model learns to stop after its answer."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids
