"""Where reduced-precision arithmetic is fast: one question, asked by healing and the SVD."""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def bf16_is_fast(device: torch.device) -> bool:
    """True where bfloat16 matmuls have fast kernels: CUDA with bf16 support, CPUs with AVX512-BF16/AMX.

    Cached per device: the SVD asks once per layer.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # oneDNN's own CPU check
    return device.type == "cpu" and check is not None and bool(check())
