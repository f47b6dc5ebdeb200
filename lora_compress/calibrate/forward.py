"""The model on calibration token ids: one place that knows how to call it without a KV cache."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .seq2seq import model_inputs


def forward(model: nn.Module, ids: torch.Tensor, **options):
    """The model on ``ids`` without a KV cache (decoders) — calibration never generates; an
    encoder-decoder's decoder gets ``ids`` shifted right (calibrate/seq2seq.py)."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        return model(**model_inputs(model, ids), use_cache=False, **options)
    return model(**model_inputs(model, ids), **options)
