"""The factored module that replaces a dense linear layer.

          x (…, in)
            │
      lora_A (r × in)        y = lora_B · (lora_A · x) + bias
            │ (…, r)
      lora_B (out × r)       B·A is never built in forward
            │
          y (…, out)

Works for ``nn.Linear`` (weight out×in) and GPT-2 ``Conv1D`` (weight in×out): the factors are
always stored in the nn.Linear orientation.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import LoraCompressError


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a GPT-2 Conv1D (which stores in×out)."""
    if is_conv1d(module):
        return module.weight.T
    return module.weight


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D (y = x·W + b with W stored in×out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def check_finite_float(name: str, weight: torch.Tensor) -> None:
    """Reject integer/quantised and non-finite weights with a message naming the layer."""
    if not weight.is_floating_point():
        raise LoraCompressError(f"{name}.weight is {weight.dtype} (quantised); dequantise the model first")
    if not bool(torch.isfinite(weight).all()):
        raise LoraCompressError(f"{name}.weight contains NaN or inf; repair or re-download the checkpoint")


class LowRankLinear(nn.Module):
    """y = B(Ax) + b with ``lora_A`` (r×in) and ``lora_B`` (out×r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Wrap given factors (copied) and an optional bias into a module."""
        module = cls(A.shape[1], B.shape[0], A.shape[0], bias=bias is not None,
                     dtype=A.dtype, device=A.device)
        with torch.no_grad():
            module.lora_A.copy_(A)
            module.lora_B.copy_(B)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """What the dense weight looks like, (out, in) in the factors' dtype, holding no values (meta):
        model code that reads a layer's weight to learn its dtype still runs (T5 casts its inputs to
        ``wo.weight.dtype``). Use :meth:`to_dense` for the matrix itself."""
        return torch.empty(self.out_features, self.in_features, dtype=self.lora_A.dtype, device="meta")

    def to_dense(self) -> torch.Tensor:
        """The (out, in) matrix B·A, for export; never used in forward."""
        return self.lora_B @ self.lora_A

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
