"""Calibration statistics of experts: each expert's sums hold only the tokens its router sends it.

An expert that receives few calibration tokens has statistics too poor to whiten with, so it falls
back to its weight spectrum: it is factored by the truncated SVD of W, which is what every
activation-aware method gives for isotropic statistics (C = c·I, F = f·I). For the budget, which
compares costs across layers, it is priced with such statistics at the scales c and f of an average
expert of its layer receiving its fair share of the tokens, rather than as free. The experts need
EXPERT_STATISTICS (the rows routed to each, and their input energy) whatever the method declares.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.experts import experts_by_matrix
from .collectors import InputDiagonal, LayerStatistics

EXPERT_STATISTICS = (InputDiagonal(),)  # each expert's input energy, for the average expert's scale


def sparse_experts(model: nn.Module, stats: dict[str, LayerStatistics], names, min_tokens: int) -> dict[str, int]:
    """Expert targets among ``names`` routed fewer than ``min_tokens`` rows → the rows each received."""
    return {name: stats[name].rows for group in experts_by_matrix(model, names).values() for name in group
            if stats[name].rows < min_tokens}


@torch.no_grad()
def isotropic_statistics(model: nn.Module, stats: dict[str, LayerStatistics], sparse: dict[str, int]) \
        -> dict[str, LayerStatistics]:
    """Statistics for the ``sparse`` experts: those of an average expert of their layer with a fair share of
    the tokens, isotropic (see the module docstring)."""
    found = {}
    for group in experts_by_matrix(model, list(stats)).values():
        few = [name for name in group if name in sparse]
        if few:
            found.update(_isotropic(model, stats, group, few))
    return found


def _isotropic(model: nn.Module, stats: dict[str, LayerStatistics], group: list[str], few: list[str]):
    rows = {name: stats[name].rows for name in group}
    seen = [name for name in group if name not in few and rows[name] > 0] or [n for n in group if rows[n] > 0]
    share = sum(rows.values()) / len(group)  # tokens an expert of this layer receives on average
    module = model.get_submodule(group[0])
    in_features, out_features = module.in_features, module.out_features
    energy = sum(float(stats[n]["input_diagonal"].sum()) / rows[n] for n in seen) / max(len(seen), 1) / in_features
    gradients = [_mean_square_gradient(stats[n]) / rows[n] for n in seen if "fisher" in stats[n]]
    found = {}
    for name in few:
        weight = model.get_submodule(name).weight.detach().double()
        values = {"input_diagonal": torch.full((in_features,), energy * share, dtype=torch.float64)}
        if out_features > in_features:
            values["gram"] = torch.eye(in_features, dtype=torch.float64) * energy * share
        else:
            values["output_gram"] = weight @ weight.T * energy * share  # W·(c·I)·Wᵀ
        if gradients:
            values["fisher"] = torch.full((out_features,), sum(gradients) / len(gradients) * share,
                                          dtype=torch.float64)  # a diagonal F: R = √f·I
        found[name] = LayerStatistics(values, stats[name].tokens, rows[name])
    return found


def _mean_square_gradient(stats: LayerStatistics) -> float:
    """Mean over output channels of the summed squared gradient (the trace of F / out)."""
    fisher = stats["fisher"]
    return float((fisher.diagonal() if fisher.dim() == 2 else fisher).double().mean())
