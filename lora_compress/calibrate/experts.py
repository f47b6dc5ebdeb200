"""Calibration statistics of experts: each expert's Gram sums only the tokens its router sends it.

An expert that receives few calibration tokens has a Gram too poor to whiten with, so it falls back
to its weight spectrum. Its statistics are replaced by isotropic ones (C = c·I, F = f·I), for which
every activation-aware method gives the plain truncated SVD of W. The scales c and f are those of an
average expert of its layer receiving its fair share of the tokens, so that the budget allocation,
which compares costs across layers, prices it as such an expert rather than as free.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.experts import experts_by_matrix
from .statistics import Statistics


def sparse_experts(stats: Statistics, model: nn.Module, names, min_tokens: int) -> dict[str, int]:
    """Expert targets whose Gram summed fewer than ``min_tokens`` rows → the rows it summed."""
    return {name: stats.rows.get(stats.owner.get(name, name), 0)
            for group in experts_by_matrix(model, names).values() for name in group
            if stats.rows.get(stats.owner.get(name, name), 0) < min_tokens}


@torch.no_grad()
def fall_back_to_weights_(stats: Statistics, model: nn.Module, names, min_tokens: int) -> dict[str, int]:
    """Give experts with fewer than ``min_tokens`` rows isotropic statistics (see the module docstring).

    Returns:
        The experts that fell back → the calibration tokens each received.
    """
    sparse = sparse_experts(stats, model, names, min_tokens)
    for group in experts_by_matrix(model, names).values():
        few = [name for name in group if name in sparse]
        if few:
            _isotropic_(stats, model, group, few)
    return sparse


def _isotropic_(stats: Statistics, model: nn.Module, group: list[str], few: list[str]) -> None:
    """Replace the statistics of ``few`` by those of an average expert of ``group`` with a fair share of tokens."""
    rows = {name: stats.rows.get(stats.owner.get(name, name), 0) for name in group}
    seen = [name for name in group if name not in few and rows[name] > 0] or [n for n in group if rows[n] > 0]
    share = sum(rows.values()) / len(group)  # tokens an expert of this layer receives on average
    in_features = model.get_submodule(group[0]).in_features
    out_features = model.get_submodule(group[0]).out_features
    energy = sum(stats.energy.get(stats.owner.get(n, n), 0.0) / rows[n] for n in seen) / max(len(seen), 1) / in_features
    gradients = [_mean_square_gradient(stats, n) / rows[n] for n in seen if n in stats.fisher]
    for name in few:
        owner = stats.owner.setdefault(name, name)
        stats.grams[owner] = torch.eye(in_features, dtype=torch.float64) * energy * share
        stats.energy[owner] = energy * share * in_features
        if name in stats.outputs:  # summed on the output side: W·(c·I)·Wᵀ
            weight = model.get_submodule(name).weight.detach().double()
            stats.outputs[name] = weight @ weight.T * energy * share
        stats.rows[owner] = rows[name]
        stats.fourth.pop(name, None)
        if gradients:
            stats.fisher[name] = torch.full((out_features,), sum(gradients) / len(gradients) * share,
                                            dtype=torch.float64)  # a diagonal F: R = √f·I
        else:
            stats.fisher.pop(name, None)


def _mean_square_gradient(stats: Statistics, name: str) -> float:
    """Mean over output channels of the summed squared gradient (the trace of F / out)."""
    fisher = stats.fisher[name]
    return float((fisher.diagonal() if fisher.dim() == 2 else fisher).double().mean())
