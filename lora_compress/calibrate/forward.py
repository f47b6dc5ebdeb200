"""The model on calibration token ids: one place that knows how to call it without a KV cache."""
from __future__ import annotations

import inspect

import torch
from torch import nn


def forward(model: nn.Module, ids: torch.Tensor, **options):
    """The model on ``ids`` without a KV cache (decoders) — calibration never generates."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, use_cache=False, **options)
    return model(input_ids=ids, **options)
