"""Pure tensor math: the experts of one layer factored on one shared basis.

    per expert   W_e ≈ B_e · A_e                      E·r·(m+n) parameters
    shared A     W_e ≈ B_e · A      A: (r×n), shared   r·n + E·r·m
    shared B     W_e ≈ B · A_e      B: (m×r), shared   r·m + E·r·n

With A shared, the best A (least Σ_e ‖W_e − B_e·A‖²_F) spans the top-r right singular vectors of the
stacked [W_1; …; W_E] (E·m × n): the eigenvectors of Σ_e W_eᵀW_e, and B_e = W_e·Aᵀ. The error is the
sum of the eigenvalues past r, so it is known before choosing. Shared B is the same on the left
(Σ_e W_e·W_eᵀ, A_e = Bᵀ·W_e). Scale convention: the shared factor has orthonormal rows (A) or columns
(B); each expert's own factor holds the scale.
"""
from __future__ import annotations

import math

import torch

from .svd import Factors

SIDES = ("input", "output")  # input: one A (r×in) for all experts; output: one B (out×r)


def shared_params(experts: int, shape: tuple[int, int], rank: int, side: str) -> int:
    """Parameters of ``experts`` matrices of ``shape`` (out, in) on a shared basis of ``rank``."""
    out_features, in_features = shape
    shared, own = (in_features, out_features) if side == "input" else (out_features, in_features)
    return rank * (shared + experts * own)


def equal_params_rank(experts: int, shape: tuple[int, int], rank: int, side: str) -> int:
    """The largest shared-basis rank whose parameters fit in those of per-expert factors at ``rank``,
    capped at the shared side's width."""
    out_features, in_features = shape
    shared, own = (in_features, out_features) if side == "input" else (out_features, in_features)
    return min(math.floor(experts * rank * (out_features + in_features) / (shared + experts * own)), shared)


def _gram(weights: torch.Tensor, side: str) -> torch.Tensor:
    """Σ_e W_eᵀW_e (in×in) for a shared A, Σ_e W_e·W_eᵀ (out×out) for a shared B, float64."""
    stacked = weights.double()  # (E, out, in)
    return torch.einsum("eoi,eoj->ij", stacked, stacked) if side == "input" else \
        torch.einsum("eio,ejo->ij", stacked, stacked)


@torch.no_grad()
def shared_spectrum(weights: torch.Tensor, side: str) -> torch.Tensor:
    """σ² of the stacked experts on ``side`` (descending): the shared basis's error at rank r is the sum past r."""
    return torch.linalg.eigvalsh(_gram(weights, side)).flip(0).clamp_min(0)


@torch.no_grad()
def shared_factors(weights: torch.Tensor, rank: int, side: str) -> list[Factors]:
    """Factors of each expert ``weights[e]`` (E, out, in) on one basis shared by all; the shared factor is
    one tensor object in every expert's Factors. ``energy_kept`` is each expert's own."""
    power, vectors = torch.linalg.eigh(_gram(weights, side))  # ascending
    basis = vectors[:, -rank:].flip(1)  # (in, r) or (out, r), orthonormal columns
    singular_values = power.flip(0).clamp_min(0).sqrt().float()
    stacked = weights.double()
    if side == "input":
        A = basis.T.to(weights.dtype)  # (r, in)
        own = [(W @ basis).to(weights.dtype) for W in stacked]  # B_e: (out, r)
        factors = [(B, A) for B in own]
    else:
        B = basis.to(weights.dtype)  # (out, r)
        factors = [(B, (basis.T @ W).to(weights.dtype)) for W in stacked]  # A_e: (r, in)
    return [Factors(B, A, singular_values, _energy(W, B, A)) for W, (B, A) in zip(stacked, factors)]


def _energy(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖²/‖W‖²: with orthonormal shared factors, the fraction of W's energy the projection keeps."""
    return float((B.double() @ A.double()).pow(2).sum() / weight.pow(2).sum().clamp_min(1e-300))
