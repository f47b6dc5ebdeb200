"""A rank per targeted layer (None = left dense): the budget allocation, or the config's per-layer rule.

With ``budget``, ranks come from :func:`lora_compress.methods.allocate.allocate` on a common-scale
cost: the Fisher-weighted whitened truncation loss Σ_{i>r} σ_i²(Rᵀ·W·L) (SENSITIVITY), an estimate
of the loss increase of cutting that layer to rank r.
"""
from __future__ import annotations

import math

from torch import nn

from ..calibrate.statistics import FULL_FISHER_MAX, Statistics
from ..core import svd as svdmath
from ..core.layers import dense_weight
from ..core.whitening import weighted_spectrum
from ..errors import LoraCompressError
from .allocate import LayerCost, allocate
from .config import CompressConfig

COST_DAMPING = 0.1  # the allocation's F damping: R·Rᵀ = F + this·mean(diag F)·I, as sequential's default
SENSITIVITY = ("fisher-weighted whitened truncation loss: sum over dropped i of sigma_i^2 of R^T·W·L, "
               f"R R^T = F + {COST_DAMPING:g}·mean(diag F)·I with F the mean output-gradient covariance of the "
               "calibration loss, shrunk towards its diagonal by the Ledoit-Wolf intensity (its diagonal g, "
               f"R = diag(sqrt(g)), for layers wider than {FULL_FISHER_MAX} outputs), L L^T = X^T X of the "
               "layer's calibration inputs")


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


def layer_costs(targets: dict[str, nn.Module], stats: Statistics) -> dict[str, LayerCost]:
    """The common-scale cost curve of every target (see SENSITIVITY)."""
    costs, factors = {}, {}
    for name, module in targets.items():
        weight, owner = dense_weight(module), stats.owner[name]
        fisher = stats.fisher.get(name)
        weights = None if fisher is None else fisher.double() / stats.tokens
        if owner not in factors:
            factors[owner] = svdmath.cholesky_factor(stats.grams[owner])[0]
        power = weighted_spectrum(weight, stats.gram(name), weights, cholesky=factors[owner], damping=COST_DAMPING)
        costs[name] = LayerCost.from_spectrum(tuple(weight.shape), power)
    return costs


def rule_ranks(config: CompressConfig, targets: dict[str, nn.Module],
               stats: Statistics | None) -> dict[str, int | None]:
    """Rank per layer by the config's per-layer rule (None = dense); ``energy`` needs the layers' Grams."""
    ranks = {}
    for name, module in targets.items():
        shape = tuple(dense_weight(module).shape)
        spectrum = weighted_spectrum(dense_weight(module), stats.gram(name)).sqrt() if config.energy else None
        rank = layer_rank(config, shape, spectrum)
        ranks[name] = rank if rank <= config.rank_limit(shape) else None
    return ranks


def choose_ranks(config: CompressConfig, targets: dict[str, nn.Module], stats: Statistics | None) -> dict[str, int | None]:
    """Rank per layer (None = dense): the budget allocation, or the config's per-layer rule."""
    if config.budget is not None:
        return allocate(layer_costs(targets, stats), config.budget, config.allocation_max_keep)
    return rule_ranks(config, targets, stats)
