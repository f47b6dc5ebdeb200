"""Factor a model's targeted layers in place by the config's method: the one in-memory entry point.

    compress_(model, CompressConfig(ratio=0.5))                                →  CompressionReport
    compress_(model, CompressConfig(budget=0.8, calib="play.txt"), tokens=ids)

The method's record (methods/registry.py) picks the pass: data-free methods factor every layer from
its weight (methods/plain.py), calibrated ones gather statistics first (methods/calibrated.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..calibrate.generation import with_written, written_sequences
from ..core.targets import expose_experts_
from ..errors import LoraCompressError
from .calibrated import compress_calibrated_
from .config import CompressConfig
from .plain import compress_plain_
from .results import CompressionReport


def compress_(model: nn.Module, config: CompressConfig, progress: bool = True,
              tokens: torch.Tensor | None = None, spill_folder: Path | None = None) -> CompressionReport:
    """Factor every targeted layer of ``model`` in place (plain SVD, or activation-aware with ``tokens``).

    Args:
        model: a transformers model (or any nn.Module with nn.Linear / Conv1D layers); fused experts
            holding a target are split into one module per expert first (core/experts.py).
        config: rank option, targets, method and SVD settings.
        progress: show a progress bar over layers.
        tokens: calibration token ids (samples, length), needed by every calibrated method
            (see :func:`lora_compress.calibrate.tokens.calibration_tokens`) unless the model writes
            them all (``config.calib_generated == 1``); a share ``config.calib_generated`` of the
            rows is replaced by sequences the model writes from its BOS token
            (:mod:`lora_compress.calibrate.generation`).
        spill_folder: where a calibrated pass parks large intermediate tensors on disk (default: a
            temporary folder of its own).

    Returns:
        A CompressionReport listing each targeted layer's rank (None when left dense).

    Example:
        >>> report = compress_(model, CompressConfig(ratio=0.5))
        >>> report.params / report.dense_params
        0.49...

    Raises:
        LoraCompressError: a bad rank for some layer, a pattern matching nothing, a bad weight.
    """
    expose_experts_(model, config.include, config.exclude)  # each expert's matrices become targets
    if config.record.calibration:
        check_calibrated(config, tokens)
        if tokens is None:  # data-free: every sequence written
            tokens = written_sequences(model, config.calib_samples, config.calib_len, config.seed)
            written = len(tokens)
        else:
            written = round(config.calib_generated * len(tokens))
            tokens = with_written(model, tokens, config.calib_generated, config.seed)
        report = compress_calibrated_(model, config, tokens, progress, spill_folder)
        report.calibration["generated"] = written
        return report
    return compress_plain_(model, config, progress)


def check_calibrated(config: CompressConfig, tokens) -> None:
    """Refuse a calibrated method without calibration tokens (or text)."""
    if config.record.calibration and tokens is None and not config.data_free:
        raise LoraCompressError(f"--method {config.method} needs calibration text; pass --calib FILE "
                                f"(or --calib-generated 1: the model writes its own)")
