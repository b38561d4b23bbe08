"""The built-in tiny model: a randomly initialised Qwen2 and a character-level tokenizer, in Hugging
Face format, so that the demo and the tests need no download.

The tokenizer is Qwen2's byte-level BPE with a vocabulary of single characters (newline, space and
printable ASCII) and no merges, so every character is one token; the R1 tags ``<think>``,
``</think>``, ``<answer>``, ``</answer>`` are single added tokens. vLLM and transformers load it as
``Qwen2Tokenizer``.
"""
from __future__ import annotations

import json
import os

TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
EOS = "<|endoftext|>"
PAD = "<|pad|>"


def _byte_char(b: int) -> str:
    """GPT-2/Qwen2 byte-level alphabet: printable bytes map to themselves, others to U+0100 + n."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if b in keep:
        return chr(b)
    return chr(256 + sorted(set(range(256)) - set(keep)).index(b))


def char_vocab() -> dict[str, int]:
    """Pad, EOS, then one token per character: newline, space and printable ASCII (byte-level form)."""
    vocab = {PAD: 0, EOS: 1}
    for b in [10] + list(range(32, 127)):
        vocab[_byte_char(b)] = len(vocab)
    return vocab


def build_tokenizer():
    """A character-level ``Qwen2Tokenizer``: byte-level BPE with the character vocabulary and no
    merges, so every character is one token and transformers and vLLM load it as Qwen2's own class."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=char_vocab(), merges=[], eos_token=EOS, pad_token=PAD,
                         unk_token=None, bos_token=None, clean_up_tokenization_spaces=False)
    tok.add_tokens(TAGS)  # normal (not special) tokens: they survive decoding
    return tok


def create_tiny_model(path: str, hidden: int = 128, layers: int = 4, heads: int = 4,
                      kv_heads: int = 2, intermediate: int = 384, max_positions: int = 1024,
                      seed: int = 0, extra_chars: str = "") -> str:
    """Write a random tiny Qwen2 (``~1M`` parameters) and its tokenizer to ``path``; returns ``path``.

    ``extra_chars``: characters beyond printable ASCII that get one token each (e.g. the Greek
    letters of the arithmetic task's mixed-language chains of thought, rollout.datasets.GREEK_CHARS).
    Idempotent: an existing model with the same settings is left as it is.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                intermediate=intermediate, max_positions=max_positions, seed=seed)
    if extra_chars:
        spec["extra_chars"] = extra_chars
    stamp = os.path.join(path, "aha_tiny.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == spec:
        return path
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer()
    if extra_chars:
        tok.add_tokens(sorted(set(extra_chars) - set(tok.get_vocab())))
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rope_theta=10000.0, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    json.dump(spec, open(stamp, "w"))
    return path
