"""The data-free pass: every targeted layer factored from its weight alone, several at once.

    targets ──ordered_map (workers)──▶ factor_weight ──▶ the method's handler ──▶ factor_module_
"""
from __future__ import annotations

from contextlib import closing

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import svd as svdmath
from ..core.layers import check_finite_float, dense_weight
from ..core.patch import factor_module_
from ..core.targets import find_targets
from ..core.workers import layer_workers, ordered_map
from .config import CompressConfig
from .ranks import check_fixed_rank, layer_rank
from .registry import LayerInputs
from .results import CompressionReport, LayerResult, new_layer_result


def compress_plain_(model: nn.Module, config: CompressConfig, progress: bool = True) -> CompressionReport:
    """Factor every targeted layer of ``model`` in place from its weight alone (a data-free method)."""
    targets = find_targets(model, config.include, config.exclude)
    check_fixed_rank(targets, config.rank)
    report = CompressionReport(config)
    workers = factoring_workers(config, targets)
    with closing(ordered_map(lambda target: _factor_target(target, config), targets.items(), workers)) as outcomes:
        for name, (result, factors) in tqdm(zip(targets, outcomes), total=len(targets), desc="factoring",
                                            unit="layer", disable=not progress):
            if factors is not None:
                factor_module_(model, name, factors)
            report.layers.append(result)
    return report


def factoring_workers(config: CompressConfig, targets: dict[str, nn.Module]) -> int:
    """Layers of ``targets`` to factor at once under ``config`` (workers.layer_workers)."""
    return layer_workers(config.workers, [tuple(dense_weight(m).shape) for m in targets.values()], config.device)


def _factor_target(target: tuple[str, nn.Module], config: CompressConfig):
    """(LayerResult, Factors or None) for one ``(name, module)``; the module is not touched."""
    result = new_layer_result(*target)
    return result, factor_weight(result, dense_weight(target[1]), config)


@torch.no_grad()
def factor_weight(result: LayerResult, weight: torch.Tensor, config: CompressConfig,
                  rank: int | None = None) -> svdmath.Factors | None:
    """Factors of one (out, in) weight on ``config.device``, or None when it stays dense.

    Fills in ``result`` (rank, energy kept, or the note saying why it stays dense). A fixed rank
    past ``config.rank_limit`` is skipped before any SVD is computed.
    """
    check_finite_float(result.name, weight)
    if rank is None and config.energy is None:
        rank = layer_rank(config, result.shape)
    limit = config.rank_limit(result.shape)
    if rank is not None and rank > limit:
        result.note = config.dense_note(rank, result.shape)
        return None
    svd_kind = "full" if rank is None else config.svd  # energy: the whole spectrum, then truncated
    factors = config.record.factor(weight.to(config.device), rank or min(result.shape), LayerInputs(),
                                   config.options, svd=svd_kind, seed=config.seed)
    if rank is None:
        rank = layer_rank(config, result.shape, factors.singular_values)
        factors = svdmath.truncate(factors, rank)
    if rank > limit:
        result.note = config.dense_note(rank, result.shape)
        return None
    result.rank, result.energy_kept = rank, factors.energy_kept
    return factors
