"""``sequential-refit``: as ``sequential``, and each layer is fitted to the dense model's outputs.

On the dense inputs X_d, the rank-r minimiser of ‖Rᵀ·(B·A·X_cᵀ − W·X_dᵀ)‖ is the weighted whitened
SVD of the least-squares target W* = W·(X_dᵀX_c)·C⁻¹, shrunk towards W by a ridge. Measured worse
than ``sequential`` on held-out text (it fits calibration noise); kept for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.svd import Factors
from ..core.whitening import aware_factors
from ..errors import LoraCompressError
from .registry import LayerInputs, register_method
from .sequential import SequentialConfig, output_weights


@dataclass(frozen=True)
class SequentialRefitConfig(SequentialConfig):
    """The output weighting's knobs, and the refit's ridge."""

    ridge: float = 0.1  # relative ridge λ/mean(diag C) of the least-squares refit (λ → ∞ gives back W)

    def __post_init__(self):
        super().__post_init__()
        if self.ridge < 0:
            raise LoraCompressError(f"ridge {self.ridge} is negative; pass 0 (the exact refit) or more")


@register_method("sequential-refit", SequentialRefitConfig, calibration=True, gradients=True, closed_loop=True,
                 dense_stream=True,
                 summary="sequential, refitted to the dense model's outputs (W* = W·X_dᵀX_c·(X_cᵀX_c)⁻¹, with a "
                         "ridge)")
def factor_refit(weight: torch.Tensor, rank: int, inputs: LayerInputs, config: SequentialRefitConfig,
                 **solver) -> Factors:
    """The rank-``rank`` minimiser of ‖Rᵀ·(B·A·X_cᵀ − W·X_dᵀ)‖_F, shrunk towards W."""
    return aware_factors(weight, rank, inputs.gram, cross=inputs.cross, weights=output_weights(inputs, config),
                         cholesky=inputs.cholesky, damping=config.fisher_damping, ridge=config.ridge,
                         output_gram=inputs.output_gram, input_shrinkage=config.input_shrinkage,
                         input_diagonal=inputs.input_diagonal)
