"""Which dtype the learner computes in: ``learner.compute_dtype`` resolved on the device it runs on.

``auto`` picks bfloat16 only where bf16 matmuls run in hardware, since emulated bf16 is slower than
float32: on this project's 2-core Xeon (AMX) a [1536 x 128] @ [128 x 384] matmul takes 0.11 ms in
bf16 and 0.79 ms in float32, while a CPU without bf16 instructions converts every element.
"""
from __future__ import annotations

import functools

import torch

_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CUDA GPU that supports bf16, or an x86 CPU
    with AMX or AVX512-BF16 (Linux's ``/proc/cpuinfo``; elsewhere False)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and any(f in _cpu_flags() for f in _CPU_BF16_FLAGS)
    return False


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``learner.compute_dtype`` (float32 | bfloat16 | auto) as a torch dtype on ``device``."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cast_parameters(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` with its parameters cast to ``dtype`` in place; buffers stay as they are (RoPE
    frequencies in float32). A no-op when they are in ``dtype`` already."""
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.to(dtype)
    return module
