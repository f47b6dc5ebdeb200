"""Parameter and byte counts, saying exactly what is counted."""
from __future__ import annotations

from torch import nn

from .layers import LowRankLinear

COUNTED = ("all unique parameter tensors (tied embeddings counted once; biases, norms, "
           "embeddings and lm_head included); targeted = the weights of the targeted linear "
           "layers (lora_A + lora_B once factored; biases not counted)")


def total_params(model: nn.Module) -> int:
    """Every parameter element, each shared tensor once (``parameters()`` already dedups)."""
    return sum(p.numel() for p in model.parameters())


def targeted_params(model: nn.Module, names) -> int:
    """Weight elements of the named layers: dense weight, or lora_A + lora_B when factored."""
    count = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            count += module.lora_A.numel() + module.lora_B.numel()
        else:
            count += module.weight.numel()
    return count

