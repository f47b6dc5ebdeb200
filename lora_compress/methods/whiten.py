"""``whiten``: SVD-LLM's closed form on the dense model's calibration inputs.

With C = XᵀX = L·Lᵀ of the inputs to the layer, the SVD of W·L gives B = U_r Σ_r and A = V_rᵀ L⁻¹:
the rank-r minimiser of ‖(W − BA)Xᵀ‖_F. Every layer is fitted on the dense model's inputs (open loop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.svd import Factors
from ..core.whitening import aware_factors
from .registry import LayerInputs, MethodConfig, register_method


@dataclass(frozen=True)
class WhitenConfig(MethodConfig):
    """SVD-LLM's closed form has no knobs: the Cholesky ridge grows only as far as C needs it."""


@register_method("whiten", WhitenConfig, calibration=True,
                 summary="SVD-LLM's whitened SVD (W·L, L·Lᵀ = XᵀX) on the dense model's calibration inputs")
def factor_whitened(weight: torch.Tensor, rank: int, inputs: LayerInputs, config: WhitenConfig,
                    **solver) -> Factors:
    """The rank-``rank`` minimiser of ‖(W − B·A)·Xᵀ‖_F on the layer's calibration inputs."""
    return aware_factors(weight, rank, inputs.gram, cholesky=inputs.cholesky, output_gram=inputs.output_gram)
