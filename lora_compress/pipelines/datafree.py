"""The data-free pass: every targeted layer factored from its weight alone, several at once.

    targets ──ordered_map (workers)──▶ factor_weight ──▶ the method's handler ──▶ factor_module_
    experts of one fused tensor ──▶ factor_experts ──▶ the method's experts handler (a method that has one)
"""
from __future__ import annotations

from contextlib import closing

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import svd as svdmath
from ..core.experts import experts_by_matrix, tie_factor_
from ..core.layers import check_finite_float, dense_weight
from ..core.patch import factor_module_
from ..core.targets import find_targets
from ..core.workers import layer_workers, ordered_map
from ..errors import OptionError
from ..calibrate.collectors import LayerStatistics
from ..methods.config import CompressConfig, RunConfig
from ..methods.ranks import check_fixed_rank, layer_rank
from ..methods.results import CompressionReport, LayerResult, new_layer_result


def compress_datafree_(model: nn.Module, config: CompressConfig, run: RunConfig = RunConfig(),
                       progress: bool = True) -> CompressionReport:
    """Factor every targeted layer of ``model`` in place from its weight alone (a data-free method), on
    ``run.device``, ``run.workers`` layers at once (0: auto)."""
    targets = find_targets(model, config.include, config.exclude)
    check_fixed_rank(targets, config.rank)
    results = {}
    for names in (experts_by_matrix(model, targets) if config.record.experts else {}).values():
        modules = [model.get_submodule(name) for name in names]
        weights = torch.stack([dense_weight(module) for module in modules])  # (E, out, in)
        for name, (result, factors) in zip(names, factor_experts(names, modules, weights, config, run)):
            if factors is not None:
                factor_module_(model, name, factors)
            if result.shared:
                tie_factor_(model, name, *result.shared)
            results[name] = result
    singles = {name: module for name, module in targets.items() if name not in results}
    workers = factoring_workers(run, singles) if singles else 1
    with closing(ordered_map(lambda target: _factor_target(target, config, run), singles.items(), workers)) as outcomes:
        for name, (result, factors) in tqdm(zip(singles, outcomes), total=len(singles), desc="factoring",
                                            unit="layer", disable=not progress):
            if factors is not None:
                factor_module_(model, name, factors)
            results[name] = result
    return CompressionReport(config, [results[name] for name in targets])


@torch.no_grad()
def factor_experts(names: list[str], modules: list[nn.Module], weights: torch.Tensor,
                   config: CompressConfig, run: RunConfig) -> list[tuple[LayerResult, svdmath.Factors | None]]:
    """(LayerResult, Factors or None) of each expert of one fused tensor, factored together by the
    method's experts handler from ``weights`` (E, out, in); the modules are not touched. A factor the
    handler shares is marked in the results of all experts but the first, which owns it.

    Raises:
        LoraCompressError: an energy rule (the experts handler spends a parameter count).
    """
    results = [new_layer_result(name, module) for name, module in zip(names, modules)]
    shape = results[0].shape
    if config.energy is not None:
        raise OptionError(f"{{method}} {config.method} spends the parameters of a rank per expert; "
                          f"pass {{rank}} or {{ratio}}, not {{energy}}")
    rank = layer_rank(config, shape)
    if rank > config.rank_limit(shape):
        for result in results:
            result.note = config.dense_note(rank, shape)
        return [(result, None) for result in results]
    for name, weight in zip(names, weights):
        check_finite_float(name, weight)
    factors = config.record.experts(weights.to(run.device), rank, config.options, solver=config.solver, seed=config.seed)
    for result, own in zip(results, factors):
        result.rank, result.energy_kept = own.rank, own.energy_kept
    for factor, field in (("lora_A", "A"), ("lora_B", "B")):
        if len(names) > 1 and all(getattr(f, field) is getattr(factors[0], field) for f in factors):
            for result in results[1:]:
                result.shared = (factor, names[0])
    return list(zip(results, factors))


def factoring_workers(run: RunConfig, targets: dict[str, nn.Module]) -> int:
    """Layers of ``targets`` to factor at once in ``run`` (workers.layer_workers)."""
    return layer_workers(run.workers, [tuple(dense_weight(m).shape) for m in targets.values()], run.device)


def _factor_target(target: tuple[str, nn.Module], config: CompressConfig, run: RunConfig):
    """(LayerResult, Factors or None) for one ``(name, module)``; the module is not touched."""
    result = new_layer_result(*target)
    return result, factor_weight(result, dense_weight(target[1]), config, run)


@torch.no_grad()
def factor_weight(result: LayerResult, weight: torch.Tensor, config: CompressConfig, run: RunConfig,
                  rank: int | None = None) -> svdmath.Factors | None:
    """Factors of one (out, in) weight on ``run.device``, or None when it stays dense.

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
    solver = "full" if rank is None else config.solver  # energy: the whole spectrum, then truncated
    factors = config.record.factor(weight.to(run.device), rank or min(result.shape), LayerStatistics({}, 0),
                                   config.options, solver=solver, seed=config.seed)
    if rank is None:
        rank = layer_rank(config, result.shape, factors.singular_values)
        factors = svdmath.truncate(factors, rank)
    if rank > limit:
        result.note = config.dense_note(rank, result.shape)
        return None
    result.rank, result.energy_kept = rank, factors.energy_kept
    return factors
