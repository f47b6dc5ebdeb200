"""Pure tensor math of activation-aware factoring: whitening on both sides of W.

    minimise ‖Rᵀ·(B·A·X_cᵀ − W*·X_dᵀ)‖_F  over rank-r B (out×r), A (r×in)

    C = X_cᵀX_c = L·Lᵀ            the inputs the factors will see (Cholesky, float64)
    R·Rᵀ = output weighting       per-channel weights w (R = diag √w) or a covariance F (damped)
    W* = W                         or, with the dense inputs' cross-Gram, the least-squares refit
    SVD of Rᵀ·W*·L = U Σ Vᵀ  →  B = R⁻ᵀ·U_r Σ_r,  A = V_rᵀ·L⁻¹

The truncation loss Σ_{i>r} σ_i² of Rᵀ·W*·L is the error above, so the spectrum doubles as a cost
per rank. Tensors in, tensors out: the methods (lora_compress.methods) choose the knobs.
"""
from __future__ import annotations

import torch

from . import svd as svdmath


def channel_weights(fisher: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Output weights on a common scale: g/mean(g) floored at ``floor`` for a diagonal (out,),
    F/mean(diag F) for a full covariance (out, out) (damped when factored: :func:`row_factor`)."""
    fisher = fisher.double()
    if fisher.dim() == 2:
        return fisher / fisher.diagonal().mean().clamp_min(1e-300)
    return (fisher / fisher.mean().clamp_min(1e-300)).clamp_min(floor)


def row_factor(weights: torch.Tensor | None, damping: float = 0.0) -> torch.Tensor | None:
    """R with R·Rᵀ the output weighting: √w for per-channel weights w (out,); for a covariance F
    (out, out), the lower Cholesky factor of F + damping·mean(diag F)·I."""
    if weights is None or weights.dim() == 1:
        return None if weights is None else weights.double().sqrt()
    F = weights.double()
    ridge = damping * F.diagonal().mean() * torch.eye(len(F), dtype=F.dtype, device=F.device)
    return svdmath.cholesky_factor(F + ridge)[0]


def _weigh_rows(matrix: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """Rᵀ·M (diag(√w)·M for a vector factor)."""
    if factor is None:
        return matrix
    return matrix * factor.unsqueeze(1) if factor.dim() == 1 else factor.T @ matrix


def _unweigh_rows(matrix: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """R⁻ᵀ·M, undoing _weigh_rows."""
    if factor is None:
        return matrix
    if factor.dim() == 1:
        return matrix / factor.unsqueeze(1)
    return torch.linalg.solve_triangular(factor.T, matrix, upper=True)


@torch.no_grad()
def aware_factors(weight: torch.Tensor, rank: int, gram: torch.Tensor, cross: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None, cholesky: torch.Tensor | None = None,
                  damping: float = 0.0, ridge: float = 0.0) -> svdmath.Factors:
    """Rank-``rank`` factors minimising ‖Rᵀ·(B·A·X_cᵀ − W·X_dᵀ)‖_F with R·Rᵀ the output weighting.

    Args:
        weight: W, (out, in).
        gram: C = X_cᵀX_c of the inputs the factors will see, (in, in).
        cross: X_dᵀX_c with the dense inputs, (in, in); None means X_d = X_c (plain whitening).
        weights: per-output-channel weights w, (out,), or an output covariance F, (out, out);
            None means all ones.
        cholesky: L with L·Lᵀ = C when already computed (layers sharing inputs share it).
        damping: F + damping·mean(diag F)·I is factored (full covariances only).
        ridge: the refit's relative ridge (see :func:`refit_target`); 0 is the exact least squares.

    Returns:
        Factors (B, A) in ``weight.dtype``; singular values are those of Rᵀ·W*·L.

    Example:
        >>> f = aware_factors(W, 8, X.T @ X)       # SVD-LLM's closed form
        >>> (W - f.B @ f.A) @ X.T                   # the smallest rank-8 output error
    """
    L = svdmath.cholesky_factor(gram)[0] if cholesky is None else cholesky  # (in, in)
    target = weight.double()  # (out, in)
    if cross is not None:
        target = refit_target(target, gram.double(), cross.double(), ridge)
    R = row_factor(weights, damping)
    M = _weigh_rows(target, R) @ L  # (out, in)
    U, S, Vh, S_all = svdmath.truncated_svd(M, rank, svd="gram")  # float64 Gram/eigh: exact for these
    A = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)  # V_rᵀ L⁻¹, (r, in)
    B = _unweigh_rows(U * S, R)  # (out, r)
    return svdmath.Factors(B.to(weight.dtype), A.to(weight.dtype), S_all.float(), svdmath.energy_kept(S_all, rank))


def refit_target(W: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """W* = W·(cross + λI)·(C + λI)⁻¹: the dense outputs' least-squares map, shrunk towards W.

    λ = ``ridge``·mean(diag C) keeps the fit from chasing calibration noise when the inputs are
    wide for the number of calibration tokens (λ → ∞ gives back W).
    """
    lam = ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    L, _ = svdmath.cholesky_factor(gram + lam)
    return torch.cholesky_solve((cross + lam).T @ W.T, L).T  # (out, in)


@torch.no_grad()
def weighted_spectrum(weight: torch.Tensor, gram: torch.Tensor, weights: torch.Tensor | None = None,
                      cholesky: torch.Tensor | None = None, damping: float = 0.0) -> torch.Tensor:
    """σ_i² of Rᵀ·W·L (R from ``weights`` and ``damping`` as in :func:`aware_factors`), descending,
    via the eigenvalues of the smaller Gram of that matrix."""
    L = svdmath.cholesky_factor(gram)[0] if cholesky is None else cholesky
    M = _weigh_rows(weight.double(), row_factor(weights, damping)) @ L  # (out, in)
    square = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return torch.linalg.eigvalsh(square).flip(0).clamp_min(0)
