"""Compression to a quality target (``max_loss_rise``): predict, cut, measure, tighten when over.

    held out     every HELD_OUT_EVERY-th calibration sequence (at least one) is kept out of the statistics
    dense loss   the mean next-token loss of the dense model on them (labels: the text's next tokens)
    cut          the calibrated pipeline allocates the fewest parameters whose predicted rise
                 (methods/ranks.predicted_rise: Σ cost / 2N) stays under the limit, and factors them
    measure      the same loss on the compressed model; rise = compressed − dense
    tighten      if the measured rise is over the target: the layers are put back dense, the limit on the
                 prediction is scaled by target / measured (the measured/predicted ratio of this model,
                 with a TIGHTEN_MARGIN), and the run repeats, at most MAX_TRIES runs in all

A repeated run repeats the gradient pass too (the costs come out the same: same dense model, same seed):
the closed-loop default method takes what that pass leaves for its fit once, and a pass over 135M parameters
costs about what its fit does. The report's ``calibration["loss_target"]`` holds the figures of every try.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn

from ..calibrate.tokens import batches
from ..core.patch import replace_module
from ..errors import OptionError, OptionWarning
from ..methods.results import CompressionReport

HELD_OUT_EVERY = 8  # one calibration sequence in 8 is held out of the statistics to measure the rise on
MAX_TRIES = 3  # compressions in all: the first and at most two tightened ones
TIGHTEN_MARGIN = 0.9  # a tightened limit aims this far under the target (the ratio measured/predicted varies)


def check_language_model(model: nn.Module) -> None:
    """Refuse a model without a next-token loss (an encoder) for ``max_loss_rise``."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise OptionError(f"{{max_loss_rise}} is a rise of the next-token loss, which {type(model).__name__} has "
                          f"not (a causal LM is needed); pass {{budget}} instead")


def held_out_split(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the rows the statistics read, the held-out rows): every HELD_OUT_EVERY-th row, counted from the last,
    is held out (at least one).

    Raises:
        OptionError: fewer than 2 calibration sequences.
    """
    count = len(tokens)
    if count < 2:
        raise OptionError(f"{{max_loss_rise}} holds 1 in {HELD_OUT_EVERY} calibration sequences out to measure the "
                          f"loss on, and {{calib_samples}} is {count}; pass {{calib_samples}} 2 or more")
    held = torch.zeros(count, dtype=torch.bool)
    held[torch.arange(count - 1, -1, -HELD_OUT_EVERY)] = True  # the last row, then every 8th back
    return tokens[~held], tokens[held]


@torch.no_grad()
def mean_loss(model: nn.Module, tokens: torch.Tensor) -> float:
    """The mean next-token loss (nats) of ``model`` on ``tokens`` (rows, length), labels the next tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in batches(tokens, 2):
        logits = model(input_ids=ids.to(device)).logits[:, :-1].float()  # (B, T-1, V)
        labels = ids[:, 1:].to(device)
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                   reduction="sum"))
        count += labels.numel()
    return total / count


def tighter_limit(limit: float, predicted: float, measured: float, target: float) -> float:
    """The next limit on the predicted rise: this model's measured/predicted ratio applied to the target, with a
    margin, and never above ``limit`` × TIGHTEN_MARGIN (also when nothing was predicted)."""
    scaled = target * TIGHTEN_MARGIN * predicted / measured if predicted > 0 and measured > 0 else 0.0
    return min(scaled, limit * TIGHTEN_MARGIN)


def compress_to_target(model: nn.Module, targets: dict[str, nn.Module], tokens: torch.Tensor, target: float,
                       compress_once: Callable[[torch.Tensor, float], CompressionReport]) -> CompressionReport:
    """Cut ``model`` in place to the fewest parameters whose measured loss rise stays under ``target`` (module
    docstring). ``compress_once(tokens, limit)`` runs the calibrated pipeline on ``tokens`` with ``limit`` on the
    predicted rise and returns its report; ``targets`` are the dense layers, put back before a repeated run."""
    check_language_model(model)
    fit, held = held_out_split(tokens)
    dense = mean_loss(model, held)
    limit, tries = target, []
    for attempt in range(MAX_TRIES):
        if attempt:
            for name, module in targets.items():
                replace_module(model, name, module)
        report = compress_once(fit, limit)
        measured = mean_loss(model, held) - dense
        predicted = report.calibration["predicted_loss_rise"]
        tries.append({"limit": round(limit, 6), "predicted": predicted, "measured": round(measured, 6),
                      "params": report.params})
        if measured <= target or not math.isfinite(measured) or attempt == MAX_TRIES - 1:
            break
        limit = tighter_limit(limit, predicted, measured, target)
    report.calibration["loss_target"] = {
        "max_loss_rise": target, "predicted": predicted, "measured": round(measured, 6), "dense_loss": round(dense, 6),
        "held_out_sequences": len(held), "held_out_tokens": int(held.shape[0] * (held.shape[1] - 1)),
        "met": bool(measured <= target), "tries": tries}
    if len(tries) > 1 or measured > target:
        warnings.warn(OptionWarning(tightening_line(report.calibration["loss_target"])), stacklevel=3)
    return report


def tightening_line(found: dict) -> str:
    """One line saying the target was tightened (or still missed), with the figures."""
    first, last = found["tries"][0], found["tries"][-1]
    line = (f"the measured loss rise {first['measured']:.3g} nats (predicted {first['predicted']:.3g}) was over "
            f"{{max_loss_rise}} {found['max_loss_rise']:g}")
    if len(found["tries"]) > 1:
        line += (f"; tightened the predicted limit to {last['limit']:.3g} and compressed again"
                 f"{' twice' if len(found['tries']) > 2 else ''}: measured {last['measured']:.3g}")
    if not found["met"]:
        line += f"; still over after {len(found['tries'])} tries (a smaller target or more {{calib_samples}} help)"
    return line
