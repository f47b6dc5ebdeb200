"""A rank per targeted layer (None = left dense): the budget's costs, or the config's per-layer rule.

With ``budget``, ranks come from :func:`lora_compress.methods.allocate.allocate` on a common-scale
cost: the Fisher-weighted whitened truncation loss Σ_{i>r} σ_i²(Rᵀ·W·L) (SENSITIVITY), an estimate
of the loss increase of cutting that layer to rank r. The costs need the statistics COST_STATISTICS,
gathered in the gradient pass whatever the method (a budget always runs it).

With ``max_loss_rise`` the same costs predict the loss itself (:func:`predicted_rise`). With labels drawn from
the model's own prediction, E[g·gᵀ] of the loss gradient at a layer's outputs is the curvature (Gauss–Newton)
of the expected loss there, so cutting a layer by ΔW raises the summed loss by about
½·Σ_t Δy_tᵀ·F_t·Δy_t, Δy_t = ΔW·x_t. Taking F_t as its mean F over the tokens (independent of x_t):
½·tr(F·ΔW·C·ΔWᵀ) = ½·‖Rᵀ·ΔW·L‖² = ½·cost, with C = Σ_t x_t·x_tᵀ. So the mean next-token loss rises by about
Σ_layers cost / (2·N), N the predicted tokens. What it leaves out: the F damping (adds), the layers'
interactions and the first-order term on the text's own labels (either sign), a closed-loop fit correcting
earlier layers' errors (lowers); measured against the held-out loss by pipelines/target.py.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..calibrate.collectors import FULL_FISHER_MAX, GradientCovariance, InputDiagonal, InputGram, LayerStatistics, \
    OutputGram
from ..core import svd as svdmath
from ..core.layers import dense_weight
from ..core.whitening import Whitening, channel_weights, input_cholesky
from ..errors import OptionError
from .allocate import LayerCost
from .config import CompressConfig

COST_DAMPING = 0.1  # the allocation's F damping: R·Rᵀ = F + this·mean(diag F)·I, as sequential's default
COST_STATISTICS = (InputGram(), OutputGram(), InputDiagonal(), GradientCovariance())
RULE_STATISTICS = (InputGram(), OutputGram(), InputDiagonal())  # the energy rule reads the whitened spectrum
SENSITIVITY = ("fisher-weighted whitened truncation loss: sum over dropped i of sigma_i^2 of R^T·W·L, "
               f"R R^T = F + {COST_DAMPING:g}·mean(diag F)·I with F the mean output-gradient covariance of the "
               "calibration loss (causal LMs: labels drawn from the model's own prediction), shrunk towards its "
               f"diagonal by the Ledoit-Wolf intensity (its diagonal g, R = diag(sqrt(g)), for layers wider than "
               f"{FULL_FISHER_MAX} outputs), L L^T = X^T X of the layer's calibration inputs, shrunk towards its "
               "diagonal as the method's fit shrinks it")


def predicted_rise(total_cost: float, predicted_tokens: int) -> float:
    """The mean next-token loss rise (nats) the summed costs predict: Σ cost / (2·N) (module docstring)."""
    return total_cost / (2 * max(predicted_tokens, 1))


def cost_limit(rise: float, predicted_tokens: int) -> float:
    """The summed cost whose :func:`predicted_rise` is ``rise``."""
    return rise * 2 * max(predicted_tokens, 1)


def check_fixed_rank(targets: dict[str, nn.Module], rank: int | None) -> None:
    """Refuse a fixed ``rank`` larger than some target's smaller side, naming the layer."""
    if rank is None:
        return
    for name, module in targets.items():
        out_features, in_features = dense_weight(module).shape
        if rank > min(out_features, in_features):
            raise OptionError(f"{{rank}} {rank} is larger than {name} ({out_features}×{in_features}) allows "
                              f"({min(out_features, in_features)}); choose a lower rank or {{exclude}} it")


def layer_rank(config: CompressConfig, shape: tuple[int, int], singular_values=None) -> int:
    """The rank the config asks for on a layer of ``shape`` (energy needs the spectrum)."""
    if config.rank is not None:
        return config.rank
    if config.ratio is not None:
        rank = svdmath.rank_for_ratio(*shape, config.ratio)
        if rank < 1:
            smallest = math.ceil(sum(shape) / (shape[0] * shape[1]) * 1000) / 1000
            raise OptionError(f"{{ratio}} {config.ratio} leaves rank 0 for a {shape[0]}×{shape[1]} layer; "
                              f"use {{ratio}} {smallest} or more")
        return rank
    return svdmath.rank_for_energy(singular_values, config.energy)


def layer_whitening(weight: torch.Tensor, stats: LayerStatistics, shrinkage: float,
                    fisher: bool = True) -> Whitening:
    """The whitened weight a layer's cost (``fisher``) or energy rule reads: its input (or output) Gram shrunk
    as the method's fit shrinks it, its outputs weighted by F damped by COST_DAMPING."""
    fisher_weights = stats.get("fisher") if fisher else None
    weights = None if fisher_weights is None else fisher_weights.double() / stats.tokens
    cholesky = (lambda: stats.shared(f"cholesky-{shrinkage}", lambda: input_cholesky(stats["gram"], shrinkage))) \
        if "gram" in stats else None
    return Whitening(weight, stats.get("gram"), stats.get("output_gram"), stats.get("input_diagonal"), weights,
                     COST_DAMPING if fisher_weights is not None else 0.0, shrinkage, cholesky=cholesky)


def layer_cost(weight: torch.Tensor, stats: LayerStatistics, shrinkage: float) -> LayerCost:
    """The common-scale cost curve of one layer (see SENSITIVITY)."""
    return LayerCost.from_spectrum(tuple(weight.shape), layer_whitening(weight, stats, shrinkage).spectrum())


def rule_rank(config: CompressConfig, weight: torch.Tensor, stats: LayerStatistics | None) -> int | None:
    """A layer's rank by the config's per-layer rule (None = dense); ``energy`` reads the whitened
    spectrum of its statistics (unweighted by F), shrunk as the method shrinks it."""
    shape = tuple(weight.shape)
    spectrum = None
    if config.energy is not None:
        spectrum = layer_whitening(weight, stats, config.options.input_shrinkage, fisher=False).spectrum().sqrt()
    rank = layer_rank(config, shape, spectrum)
    return rank if rank <= config.rank_limit(shape) else None


__all__ = ["COST_DAMPING", "COST_STATISTICS", "RULE_STATISTICS", "SENSITIVITY", "channel_weights",
           "check_fixed_rank", "cost_limit", "layer_cost", "layer_rank", "layer_whitening", "predicted_rise",
           "rule_rank"]
