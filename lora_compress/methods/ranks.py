"""A rank per targeted layer (None = left dense): the budget allocation, or the config's per-layer rule.

With ``budget``, ranks come from :func:`lora_compress.methods.allocate.allocate` on a common-scale
cost: the Fisher-weighted whitened truncation loss Σ_{i>r} σ_i²(Rᵀ·W·L) (SENSITIVITY), an estimate
of the loss increase of cutting that layer to rank r.
"""
from __future__ import annotations

import math
from contextlib import closing

import torch
from torch import nn

from ..calibrate.statistics import FULL_FISHER_MAX, Statistics
from ..core import svd as svdmath
from ..core.layers import dense_weight
from ..core.whitening import needs_cholesky, shrunk_gram, weighted_spectrum
from ..core.workers import ordered_map
from ..errors import LoraCompressError
from .allocate import LayerCost, allocate
from .config import CompressConfig

COST_DAMPING = 0.1  # the allocation's F damping: R·Rᵀ = F + this·mean(diag F)·I, as sequential's default
SENSITIVITY = ("fisher-weighted whitened truncation loss: sum over dropped i of sigma_i^2 of R^T·W·L, "
               f"R R^T = F + {COST_DAMPING:g}·mean(diag F)·I with F the mean output-gradient covariance of the "
               "calibration loss (causal LMs: labels drawn from the model's own prediction), shrunk towards its "
               f"diagonal by the Ledoit-Wolf intensity (its diagonal g, R = diag(sqrt(g)), for layers wider than "
               f"{FULL_FISHER_MAX} outputs), L L^T = X^T X of the layer's calibration inputs, shrunk towards its "
               "diagonal as the method's fit shrinks it")


def check_fixed_rank(targets: dict[str, nn.Module], rank: int | None) -> None:
    """Refuse a fixed ``rank`` larger than some target's smaller side, naming the layer."""
    if rank is None:
        return
    for name, module in targets.items():
        out_features, in_features = dense_weight(module).shape
        if rank > min(out_features, in_features):
            raise LoraCompressError(f"--rank {rank} is larger than {name} ({out_features}×{in_features}) allows "
                                    f"({min(out_features, in_features)}); choose a lower rank or --exclude it")


def layer_rank(config: CompressConfig, shape: tuple[int, int], singular_values=None) -> int:
    """The rank the config asks for on a layer of ``shape`` (energy needs the spectrum)."""
    if config.rank is not None:
        return config.rank
    if config.ratio is not None:
        rank = svdmath.rank_for_ratio(*shape, config.ratio)
        if rank < 1:
            smallest = math.ceil(sum(shape) / (shape[0] * shape[1]) * 1000) / 1000
            raise LoraCompressError(f"--ratio {config.ratio} leaves rank 0 for a {shape[0]}×{shape[1]} layer; "
                                    f"use --ratio {smallest} or more")
        return rank
    return svdmath.rank_for_energy(singular_values, config.energy)


def layer_costs(targets: dict[str, nn.Module], stats: Statistics, workers: int = 1,
                shrinkage: float = 0.0) -> dict[str, LayerCost]:
    """The common-scale cost curve of every target (see SENSITIVITY), ``workers`` layers at once, with each
    input Gram shrunk towards its diagonal by ``shrinkage`` as the method's fit shrinks it."""
    choleskies = {}  # owner → L, for the tall layers (out > in) on their input side only: the others need none
    for name, module in targets.items():
        owner = stats.owner[name]
        if owner not in choleskies and name not in stats.outputs and needs_cholesky(tuple(dense_weight(module).shape)):
            choleskies[owner] = svdmath.cholesky_factor(shrunk_gram(stats.grams[owner], shrinkage))[0]

    def cost(name: str) -> LayerCost:
        weight, fisher = dense_weight(targets[name]), stats.fisher.get(name)
        weights = None if fisher is None else fisher.double() / stats.tokens
        power = weighted_spectrum(weight, stats.input_gram(name), weights, cholesky=choleskies.get(stats.owner[name]),
                                  damping=COST_DAMPING, output_gram=stats.outputs.get(name), input_shrinkage=shrinkage,
                                  input_diagonal=stats.input_diagonal(name))
        return LayerCost.from_spectrum(tuple(weight.shape), power)

    with closing(ordered_map(cost, list(targets), workers)) as found:
        return dict(zip(targets, found))


def rule_rank(config: CompressConfig, weight: torch.Tensor, gram: torch.Tensor | None,
              output_gram: torch.Tensor | None = None, diagonal: torch.Tensor | None = None) -> int | None:
    """A layer's rank by the config's per-layer rule (None = dense); ``energy`` reads the whitened
    spectrum of its input Gram (or of its output Gram), shrunk as the method shrinks it."""
    shape = tuple(weight.shape)
    spectrum = weighted_spectrum(weight, gram, output_gram=output_gram, input_shrinkage=config.options.gram_shrinkage,
                                 input_diagonal=diagonal).sqrt() if config.energy else None
    rank = layer_rank(config, shape, spectrum)
    return rank if rank <= config.rank_limit(shape) else None


def rule_ranks(config: CompressConfig, targets: dict[str, nn.Module],
               stats: Statistics | None) -> dict[str, int | None]:
    """Rank per layer by the config's per-layer rule (None = dense); ``energy`` needs the layers' Grams."""
    return {name: rule_rank(config, dense_weight(module), stats.input_gram(name) if config.energy else None,
                            stats.outputs.get(name) if config.energy else None, stats.input_diagonal(name))
            for name, module in targets.items()}


def choose_ranks(config: CompressConfig, targets: dict[str, nn.Module], stats: Statistics | None) -> dict[str, int | None]:
    """Rank per layer (None = dense): the budget allocation, or the config's per-layer rule."""
    if config.budget is not None:
        return allocate(layer_costs(targets, stats, shrinkage=config.options.gram_shrinkage), config.budget,
                        config.allocation_max_keep)
    return rule_ranks(config, targets, stats)
