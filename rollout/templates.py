"""Prompt templates. The R1-Zero template is the default for math tasks.

A template turns a question into the text the model continues. Names are looked up in
:data:`TEMPLATES`; an unknown name raises and lists the known ones. Most templates are plain format
strings; ``chat`` is built from the tokenizer's own chat template, for instruct models.
"""
from __future__ import annotations

R1_INSTRUCTION = (
    "The assistant first thinks about the reasoning process in the mind and then provides the "
    "user with the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> "
    "answer here </answer>."
)
"""R1-Zero's format instruction (the sentences about the tags); the ``chat`` template's system
message."""

R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves "
    "it. " + R1_INSTRUCTION + " User: {question}. Assistant: <think>"
)
"""DeepSeek-R1 paper, Table 1; the completion starts inside the think block."""

R1_ZERO_COMPACT = "User: {question} Assistant: <think>"
"""R1-Zero's conversation and tag format without the instruction paragraph. For the built-in
character-level tiny model, which cannot read instructions: the paragraph would be ~400 of every
sequence's ~430 tokens, i.e. ~15x the learner's work for nothing."""

CHAT = "chat"
"""For instruct models: the tokenizer's chat template renders :data:`R1_INSTRUCTION` as the system
message (folded into the user message where the template has no system role) and the question as
the user message, with the generation prompt; ``<think>`` is appended so that the completion starts
inside the think block, as with :data:`R1_ZERO`. Needs the tokenizer, see :func:`render`."""

TEMPLATES: dict[str, str | None] = {
    "r1_zero": R1_ZERO,
    "r1_zero_compact": R1_ZERO_COMPACT,
    "plain": "{question}",
    "qa": "Question: {question}\nAnswer:",
    CHAT: None,  # not a format string: built from the tokenizer's chat template by render()
}


def render(template: str, question: str, tokenizer=None) -> str:
    """The text the model continues.

    The format-string templates ignore ``tokenizer``. ``chat`` needs it: a Hugging Face tokenizer
    (or vLLM's, which is one) whose ``chat_template`` is set; without one it raises ``ValueError``
    (use ``r1_zero`` for a base model). Special tokens of the chat format (e.g. ``<|im_start|>``,
    a BOS) are in the returned text; :func:`encode_prompt` turns them into their ids.
    """
    if template not in TEMPLATES:
        text_names = ", ".join(sorted(n for n, t in TEMPLATES.items() if t is not None))
        raise ValueError(f"unknown prompt template {template!r}; known: {text_names}, and {CHAT} "
                         f"(the tokenizer's chat template)")
    if template == CHAT:
        return _render_chat(question, tokenizer)
    return TEMPLATES[template].format(question=question)


def _render_chat(question: str, tokenizer) -> str:
    if tokenizer is None:
        raise ValueError(f"prompt template {CHAT!r} is built from the tokenizer's chat template, and "
                         f"no tokenizer was given; pass tokenizer=, or use 'r1_zero' (plain text)")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"prompt template {CHAT!r} needs a tokenizer with a chat template, and "
                         f"{name!r} has none (a base model?); use 'r1_zero' (plain text) instead")
    import jinja2

    def apply(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    text = None
    try:
        text = apply([{"role": "system", "content": R1_INSTRUCTION},
                      {"role": "user", "content": question}])
    except jinja2.TemplateError:  # e.g. Gemma's "System role not supported"
        pass
    if text is None or R1_INSTRUCTION not in text:  # rejected, or silently dropped
        text = apply([{"role": "user", "content": f"{R1_INSTRUCTION}\n\n{question}"}])
    # Some generation prompts already open the think block (e.g. "<think>\n"): not a second one.
    stripped = text.rstrip()
    return stripped if stripped.endswith("<think>") else text + "<think>"


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt, with the BOS token where the tokenizer's model expects one
    (``add_bos_token``, e.g. Llama) and not twice. The tokenizer adds no special token of its own
    (``add_special_tokens=False``); special tokens written in the text, as a chat template writes
    its turn markers and often the BOS, become their ids, so a prompt whose text starts with the BOS
    gets no second one. The engine, the SFT stage and length checks all encode prompts this way."""
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
