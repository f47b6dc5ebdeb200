"""``svd``: plain truncated SVD of each weight, no calibration (Eckart–Young: the best rank-r W in
Frobenius norm; it ignores which input directions the model uses, so it wrecks real LLMs)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import svd as svdmath
from .registry import LayerStatistics, MethodConfig, register_method


@dataclass(frozen=True)
class SvdConfig(MethodConfig):
    """Plain SVD has no knobs of its own: the solver (``CompressConfig.solver``) and its seed serve every method."""


@register_method("svd", SvdConfig, summary="truncated SVD of each targeted weight")
def factor_svd(weight: torch.Tensor, rank: int, stats: LayerStatistics, config: SvdConfig, *, solver: str = "auto",
               seed: int = 0) -> svdmath.Factors:
    """Top-``rank`` SVD of ``weight`` (out, in) by the ``solver`` (seeded when randomized)."""
    return svdmath.factorize(weight, rank, solver=solver, seed=seed)
