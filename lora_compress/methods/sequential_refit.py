"""``sequential-refit``: as ``sequential``, and each layer is fitted to the dense model's outputs.

On the dense inputs X_d, the rank-r minimiser of ‖Rᵀ·(B·A·X_cᵀ − W·X_dᵀ)‖ is the weighted whitened
SVD of the least-squares target W* = W·(X_dᵀX_c)·C⁻¹, shrunk towards W by a ridge. Measured worse
than ``sequential`` on held-out text (it fits calibration noise); kept for comparison.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate.collectors import CrossGram, GradientCovariance, InputGram
from ..core.svd import Factors
from ..errors import LoraCompressError
from .registry import LayerStatistics, register_method
from .sequential import SequentialConfig, sequential_whitening


@dataclass(frozen=True)
class SequentialRefitConfig(SequentialConfig):
    """The output weighting's knobs, and the refit's ridge."""

    ridge: float = 0.1  # relative ridge λ/mean(diag C) of the least-squares refit (λ → ∞ gives back W)

    def __post_init__(self):
        super().__post_init__()
        if self.ridge < 0:
            raise LoraCompressError(f"ridge {self.ridge} is negative; pass 0 (the exact refit) or more")


@register_method("sequential-refit", SequentialRefitConfig, closed_loop=True,
                 statistics=(InputGram(every_layer=True), CrossGram(), GradientCovariance()),
                 summary="sequential, refitted to the dense model's outputs (W* = W·X_dᵀX_c·(X_cᵀX_c)⁻¹, with a "
                         "ridge)")
def factor_refit(weight: torch.Tensor, rank: int, stats: LayerStatistics, config: SequentialRefitConfig,
                 **solver) -> Factors:
    """The rank-``rank`` minimiser of ‖Rᵀ·(B·A·X_cᵀ − W·X_dᵀ)‖_F, shrunk towards W."""
    return sequential_whitening(weight, stats, config, cross=stats["cross"], ridge=config.ridge).factors(rank)
