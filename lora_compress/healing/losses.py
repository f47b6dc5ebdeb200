"""The distillation losses, against the teacher's cached features.

    "kl":        KL(p_t ‖ p_s), mean per token, from the heads' inputs (kl.py)   causal LMs (their default)
    "hidden":    ‖h_s − h_t‖² / ‖h_t‖² over the batch                             encoders (their default)
    "kl+blocks": KL plus ``block_weight`` × the mean per-token ‖h_s − h_t‖²/‖h_t‖² at up to BLOCK_TARGETS
                 evenly spaced decoder-block outputs                           causal LMs
"""
from __future__ import annotations

import torch
from torch import nn

from .kl import linear_kl
from .teacher import features


def distill_loss(model: nn.Module, head: nn.Module | None, ids: torch.Tensor, target: torch.Tensor,
                 loss: str, block_weight: float = 1.0) -> torch.Tensor:
    """The distillation loss of ``model`` on ``ids`` against the teacher's cached features ``target``."""
    hidden = features(model, ids, "blocks" in loss).float()  # (B, T, C) or (B, K + 1, T, C)
    total = hidden.new_zeros(())
    if "blocks" in loss:
        if hidden.shape[1] > 1:  # a one-block model has no block output before the last
            total = total + block_weight * token_relative_error(hidden[:, :-1], target[:, :-1])
        hidden, target = hidden[:, -1], target[:, -1]
    if "hidden" in loss:
        total = total + (hidden - target).pow(2).sum() / target.pow(2).sum()
    if "kl" in loss:
        # logits stay float32 (bf16 rounding shifts the KL); the gradient's product runs at autocast's precision
        device = hidden.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
        total = total + linear_kl(hidden.flatten(0, 1), target.flatten(0, 1), model.get_output_embeddings(), head, low)
    return total


def token_relative_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (and blocks) of ‖h_s − h_t‖² / ‖h_t‖²: per token, so the few tokens with
    massive activations (the first of a sequence) do not outweigh the rest."""
    return ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)).mean()
