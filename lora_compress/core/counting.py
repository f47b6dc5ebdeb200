"""Parameter and byte counts, saying exactly what is counted."""
from __future__ import annotations

from torch import nn

from .experts import expert_weight_numel
from .layers import LowRankLinear

COUNTED = ("all unique parameter tensors (tied embeddings counted once; biases, norms, "
           "embeddings and lm_head included); targeted = the weights of the targeted linear "
           "layers (lora_A + lora_B once factored; biases not counted)")


def total_params(model: nn.Module) -> int:
    """Every parameter element, each shared tensor once (``parameters()`` already dedups)."""
    return sum(p.numel() for p in model.parameters())


def targeted_params(model: nn.Module, names) -> int:
    """Weight elements of the named layers: dense weight, or lora_A + lora_B when factored; a factor
    shared by several layers (a shared basis across experts) once; an expert's matrix while its
    experts are still fused, its slice."""
    seen, count = set(), 0
    for name in names:
        fused = expert_weight_numel(model, name)
        if fused is not None:
            count += fused
            continue
        module = model.get_submodule(name)
        weights = (module.lora_A, module.lora_B) if isinstance(module, LowRankLinear) else (module.weight,)
        count += sum(w.numel() for w in weights if id(w) not in seen)
        seen.update(id(w) for w in weights)
    return count

