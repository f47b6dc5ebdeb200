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


def half_is_fast(dtype: torch.dtype, device: torch.device) -> bool:
    """True where matmuls in ``dtype`` (bfloat16 or float16) have fast kernels: bf16 as above, fp16 on CUDA."""
    if dtype == torch.bfloat16:
        return bf16_is_fast(device)
    return dtype == torch.float16 and device.type == "cuda"


def compute_dtype(storage: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to compute in for weights stored in ``storage``: float32 for half precision where the
    device has no fast kernels for it (a bf16 block forward ran 4× slower than float32 on a CPU without
    AVX512-BF16, and its LM-head backward did not finish in 9 minutes), else ``storage`` itself."""
    if storage in (torch.float16, torch.bfloat16) and not half_is_fast(storage, device):
        return torch.float32
    return storage
