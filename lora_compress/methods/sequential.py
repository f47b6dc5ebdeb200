"""``sequential`` (the default with calibration text): closed loop and two-sided whitening.

Block by block, each layer is fitted on the inputs X_c that the already compressed layers produce
(C = X_cᵀX_c = L·Lᵀ), and its outputs are weighted by the output-gradient covariance F of the
calibration loss: the SVD of Rᵀ·W·L with R·Rᵀ = F + damping, B = R⁻ᵀ·U_r Σ_r, A = V_rᵀ·L⁻¹. Together C
and F are a Kronecker-factored estimate of the loss's curvature in the layer, so the kept directions
are those the loss is sensitive to. F is the full out×out covariance, shrunk towards its diagonal
(calibrate/collectors.py), for layers with up to FULL_FISHER_MAX outputs, and its diagonal g
(R = diag √g, floored) for wider ones (benchmarks/quality.md: the full F beats the diagonal at every
cut on SmolLM2 and MiniLM). C is shrunk towards its diagonal, (1 − s)·C + s·diag(C): each input
channel keeps its own scale (the outlier channels that make whitening beat plain SVD), while the
correlations between channels, which belong to the calibration text, count only for 1 − s, so a
direction that text never excites is not cut for free.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibrate.collectors import GradientCovariance, InputDiagonal, InputGram, OutputGram
from ..core.svd import Factors
from ..core.whitening import Whitening, channel_weights
from ..errors import LoraCompressError
from .registry import LayerStatistics, MethodConfig, register_method
from .whiten import shared_cholesky

STATISTICS = (InputGram(), OutputGram(), InputDiagonal(), GradientCovariance())


@dataclass(frozen=True)
class SequentialConfig(MethodConfig):
    """The output weighting's knobs."""

    output_damping: float = 0.1  # full F: R·Rᵀ = F + this·mean(diag F)·I (SmolLM2 20%, F unshrunk: 0.001–0.1 beat the diagonal)
    output_floor: float = 1e-2  # diagonal weights g/mean(g) are floored here so no output channel is ignored
    input_shrinkage: float = 0.3  # C ← (1 − s)·C + s·diag(C) before whitening (issue 17: 0.3 beat 0 and 0.6 off the calibration text)

    def __post_init__(self):
        for name in ("output_damping", "output_floor"):
            if getattr(self, name) < 0:
                raise LoraCompressError(f"{name} {getattr(self, name)} is negative; pass 0 or more")
        if not 0 <= self.input_shrinkage <= 1:
            raise LoraCompressError(f"input_shrinkage {self.input_shrinkage} is outside [0, 1]; pass e.g. 0.3")


def output_weights(stats: LayerStatistics, config: SequentialConfig) -> torch.Tensor | None:
    """The layer's output weighting on a common scale (None without gradient moments)."""
    fisher = stats.get("fisher")
    return None if fisher is None else channel_weights(fisher, config.output_floor)


def sequential_whitening(weight: torch.Tensor, stats: LayerStatistics, config: SequentialConfig,
                         **refit) -> Whitening:
    """The two-sided whitening of one layer (``refit``: the dense stream's cross-Gram and a ridge)."""
    return Whitening(weight, stats.get("gram"), stats.get("output_gram"), stats.get("input_diagonal"),
                     output_weights(stats, config), config.output_damping, config.input_shrinkage,
                     cholesky=shared_cholesky(stats, config.input_shrinkage), **refit)


@register_method("sequential", SequentialConfig, statistics=STATISTICS, closed_loop=True,
                 summary="closed loop, block by block: SVD of Rᵀ·W·L, whitened by the compressed model's own "
                         "inputs (L·Lᵀ = XᵀX) and weighted by the loss gradient's covariance (R·Rᵀ = F)")
def factor_sequential(weight: torch.Tensor, rank: int, stats: LayerStatistics, config: SequentialConfig,
                      **solver) -> Factors:
    """The rank-``rank`` minimiser of ‖Rᵀ·(W − B·A)·X_cᵀ‖_F."""
    return sequential_whitening(weight, stats, config).factors(rank)
