"""``shared-basis``: the experts of one layer on one shared basis, where that beats per-expert SVD.

The experts of a MoE layer read the same hidden states and write into the same residual stream, and
when they grew from one dense MLP (sparse upcycling) they stay alike. One A (r×in) for all of a
layer's experts plus a B_e (out×r) each, or one B plus an A_e each, then keeps more of them than
per-expert factors at the same parameter count (core/shared_basis.py). Random experts share nothing,
and there per-expert SVD keeps more. So, for each fused tensor, the parameters the rank rule gives
per expert, E·r·(m+n), are spent on whichever of per-expert SVD, a shared A or a shared B (``side``)
leaves the least weight error; that error is known in closed form before factoring. Layers outside
the experts get the plain truncated SVD. Data-free: no calibration text.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import svd as svdmath
from ..core.shared_basis import SIDES, equal_params_rank, shared_factors, shared_spectrum
from ..errors import LoraCompressError
from .registry import LayerStatistics, MethodConfig, register_method

CHOICES = ("auto", *SIDES, "per-expert")


@dataclass(frozen=True)
class SharedBasisConfig(MethodConfig):
    """Which basis a layer's experts share."""

    side: str = "auto"  # auto: the least weight error of per-expert, input (one A) and output (one B); or force one

    def __post_init__(self):
        if self.side not in CHOICES:
            raise LoraCompressError(f"side {self.side!r} is unknown; choose one of {', '.join(CHOICES)}")


def basis_errors(weights: torch.Tensor, rank: int, sides=CHOICES[1:]) -> dict[str, tuple[float, int]]:
    """Per option, (Σ_e ‖W_e − B_e·A_e‖²_F, rank) at the parameters of per-expert rank ``rank``."""
    experts, out_features, in_features = weights.shape
    errors = {}
    for side in sides:
        if side == "per-expert":
            power = torch.linalg.svdvals(weights.double()).pow(2)  # (E, k)
            errors[side] = (float(power[:, rank:].sum()), rank)
            continue
        shared_rank = equal_params_rank(experts, (out_features, in_features), rank, side)
        if shared_rank >= 1:
            errors[side] = (float(shared_spectrum(weights, side)[shared_rank:].sum()), shared_rank)
    return errors


def factor_shared_experts(weights: torch.Tensor, rank: int, config: SharedBasisConfig, *, solver: str = "auto",
                          seed: int = 0) -> list[svdmath.Factors]:
    """Factors of each expert ``weights[e]`` (E, out, in) within the parameters of per-expert rank ``rank``;
    on a shared basis the shared factor is one tensor object in every expert's Factors."""
    errors = basis_errors(weights, rank, CHOICES[1:] if config.side == "auto" else (config.side,))
    side = min(errors, key=lambda option: errors[option][0])
    if side == "per-expert":
        return [svdmath.factorize(weight, rank, solver=solver, seed=seed) for weight in weights]
    return shared_factors(weights, errors[side][1], side)


@register_method("shared-basis", SharedBasisConfig, experts=factor_shared_experts,
                 summary="a layer's experts on one shared A or B (per-expert SVD where that keeps more), at the "
                         "parameters of the rank rule; other layers by truncated SVD")
def factor_shared_basis(weight: torch.Tensor, rank: int, stats: LayerStatistics, config: SharedBasisConfig, *,
                        solver: str = "auto", seed: int = 0) -> svdmath.Factors:
    """A layer outside the experts: the top-``rank`` SVD of ``weight``."""
    return svdmath.factorize(weight, rank, solver=solver, seed=seed)
