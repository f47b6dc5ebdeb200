"""``whiten``: SVD-LLM's closed form on the dense model's calibration inputs.

With C = XᵀX = L·Lᵀ of the inputs to the layer, the SVD of W·L gives B = U_r Σ_r and A = V_rᵀ L⁻¹:
the rank-r minimiser of ‖(W − BA)Xᵀ‖_F. Every layer is fitted on the dense model's inputs (open loop);
a layer with out ≤ in is whitened from the Gram of its outputs (core/whitening.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate.collectors import InputGram, OutputGram
from ..core.svd import Factors
from ..core.whitening import Whitening, input_cholesky
from .registry import LayerStatistics, MethodConfig, register_method


@dataclass(frozen=True)
class WhitenConfig(MethodConfig):
    """SVD-LLM's closed form has no knobs: the Cholesky ridge grows only as far as C needs it."""


def shared_cholesky(stats: LayerStatistics, shrinkage: float = 0.0):
    """A function making L (L·Lᵀ = the shrunk input Gram) once for the layers that share the input."""
    return lambda: stats.shared(f"cholesky-{shrinkage}", lambda: input_cholesky(stats["gram"], shrinkage))


@register_method("whiten", WhitenConfig, statistics=(InputGram(), OutputGram()),
                 summary="SVD-LLM's whitened SVD (W·L, L·Lᵀ = XᵀX) on the dense model's calibration inputs")
def factor_whitened(weight: torch.Tensor, rank: int, stats: LayerStatistics, config: WhitenConfig,
                    **solver) -> Factors:
    """The rank-``rank`` minimiser of ‖(W − B·A)·Xᵀ‖_F on the layer's calibration inputs."""
    return Whitening(weight, stats.get("gram"), stats.get("output_gram"),
                     cholesky=shared_cholesky(stats)).factors(rank)
