"""What learns while healing: the factors (rebalanced first), lora_B alone, or an extra LoRA; and the
precision the student's body runs at.

"AB" trains both factors of every LowRankLinear, first rebalanced so each rank component has equal
norms in B and A (B·A unchanged); "B" only lora_B; "lora" a small extra LoRA (b·a, b starting at zero)
on each factored layer, concatenated into the factors at the end (rank grows by ``lora_rank``). Every
other parameter stays bit-identical. Training runs in eval mode (no dropout). The student's transformer
body runs in bfloat16 autocast where the device has fast bf16 kernels (``precision``: about 1.35× the
steps per minute on an AVX512-BF16 CPU, same loss per step on a well-compressed model); the LM heads,
the KL and the teacher's cached features stay float32, because bf16 logits shift the KL. On a badly
broken model (plain SVD, KL ≈ 5.7) bf16 steps still heal less per step than float32 ones: pass
``--precision float32`` there.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..core.layers import LowRankLinear
from ..core.patch import replace_module
from ..core.precision import bf16_is_fast
from ..errors import OptionError
from ..storage.compressed import factored_modules
from .config import HealConfig


class ExtraLora:
    """A rank-k LoRA added to each factored layer's output through forward hooks (scale 1)."""

    def __init__(self, modules: dict[str, LowRankLinear], rank: int):
        device = next(iter(modules.values())).lora_A.device
        self.a = {n: nn.Parameter((torch.randn(rank, m.in_features) / m.in_features ** 0.5).to(device))  # (k, in)
                  for n, m in modules.items()}
        self.b = {n: nn.Parameter(torch.zeros(m.out_features, rank, device=device))  # (out, k)
                  for n, m in modules.items()}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def add_lora(module, args, output):
            return output + F.linear(F.linear(args[0], self.a[name]), self.b[name])
        return add_lora

    def parameters(self) -> list[nn.Parameter]:
        return list(self.a.values()) + list(self.b.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def merge_(self, model: nn.Module) -> None:
        """Remove the hooks; each layer becomes [B, b]·[A; a] (rank r + k), the old factors unchanged."""
        self.remove()
        for name, module in factored_modules(model).items():
            B = torch.cat([module.lora_B, self.b[name].to(module.lora_B)], dim=1)  # (out, r + k)
            A = torch.cat([module.lora_A, self.a[name].to(module.lora_A)], dim=0)  # (r + k, in)
            replace_module(model, name, LowRankLinear.from_factors(B, A, module.bias))


def trainable(model: nn.Module, config: HealConfig) -> tuple[list[nn.Parameter], ExtraLora | None]:
    """Freeze everything, then unfreeze the trained set; returns it (and the extra LoRA, if any)."""
    model.requires_grad_(False)
    modules = factored_modules(model)
    distillation_mode(model, config.checkpointing)
    if config.train == "lora":
        extra = ExtraLora(modules, config.lora_rank)
        return extra.parameters(), extra
    params = [m.lora_B for m in modules.values()]
    if config.train == "AB":
        balance_(modules.values())
        params += [m.lora_A for m in modules.values()]
    for param in params:
        param.requires_grad_(True)
    return params, None


@torch.no_grad()
def balance_(modules) -> None:
    """Give each rank component equal norms in B and A (product unchanged, up to rounding).

    SVD factors carry Σ in B: B's entries are ~10⁴ times A's, and Adam's per-entry steps of ~lr
    would then wreck A and barely move B.
    """
    for module in modules:
        scale = (module.lora_A.norm(dim=1) / module.lora_B.norm(dim=0).clamp_min(1e-30)).sqrt()  # (r,)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        module.lora_B.mul_(scale)
        module.lora_A.div_(scale.unsqueeze(1))


def distillation_mode(model: nn.Module, checkpointing: bool) -> None:
    """Eval mode (no dropout: the teacher ran without it); checkpointed blocks alone flagged as
    training, because transformers checkpoints a block only then."""
    model.eval()
    if not checkpointing:
        return
    try:
        model.activation_checkpointing_enable()
    except ValueError:
        raise OptionError(f"{type(model).__name__} does not support gradient checkpointing; "
                          f"drop {{checkpointing}}") from None
    for module in model.modules():
        module.training = module.training or getattr(module, "gradient_checkpointing", False) is True


def restore(model: nn.Module, dtype: torch.dtype, grad_flags: dict) -> None:
    """The model as healing found it: its dtype, no checkpointing, its grad flags, eval mode."""
    model.to(dtype)
    model.activation_checkpointing_disable() if model.is_activation_checkpointing else None
    for p in model.parameters():
        p.requires_grad_(grad_flags.get(p, True))
    model.eval()


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` → ``bfloat16`` where the device has fast bf16 kernels, else ``float32``."""
    if precision != "auto":
        return precision
    return "bfloat16" if bf16_is_fast(device) else "float32"


def autocast(device: torch.device, precision: str):
    """The autocast context for training steps at a resolved ``precision``: bfloat16 matmuls, or a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
