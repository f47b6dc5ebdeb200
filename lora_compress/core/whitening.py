"""Pure tensor math of activation-aware factoring: whitening on both sides of W.

    minimise ‖Rᵀ·(B·A·X_cᵀ − W*·X_dᵀ)‖_F  over rank-r B (out×r), A (r×in)

    C = X_cᵀX_c                    the inputs the factors will see (float64 sums)
    R·Rᵀ = output weighting        per-channel weights w (R = diag √w) or a covariance F (damped)
    W* = W                         or, with the dense inputs' cross-Gram, the least-squares refit

The best rank-r map keeps the top-r left singular directions of Y = Rᵀ·W*·X_cᵀ, the eigenvectors U_r
of Y·Yᵀ = Rᵀ·W*·C·W*ᵀ·R, and projects W* onto them: B·A = R⁻ᵀ·U_r·U_rᵀ·Rᵀ·W*. Two routes compute it,
on the smaller side of W (both give SVD-LLM's factors; they differ by rounding only):

    out ≤ in   output space: eigh of Rᵀ·W·C·Wᵀ·R (out×out); no Cholesky of C, no ridge, C may be singular
               B = R⁻ᵀ·U_r·Σ_r,  A = Σ_r⁻¹·U_rᵀ·Rᵀ·W
    out > in   input space: C = L·Lᵀ (Cholesky), eigh of Lᵀ·Wᵀ·R·Rᵀ·W·L (in×in) for V_r
               B = R⁻ᵀ·(Rᵀ·W·L)·V_r = R⁻ᵀ·U_r·Σ_r,  A = V_rᵀ·L⁻¹

The output route never forms L: for a wide layer (down_proj, in = 8,960 or 14,336) that saves an
in×in Cholesky (in³/3 multiply-adds) and its in² floats. The truncation loss Σ_{i>r} σ_i² is the
error above, so the spectrum doubles as a cost per rank. Tensors in, tensors out: the methods
(lora_compress.methods) choose the knobs.
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


def needs_cholesky(shape: tuple[int, int], refit: bool = False) -> bool:
    """Whether factoring a layer of ``shape`` (out, in) takes the Cholesky factor of its input Gram:
    for tall layers (out > in) and for the refit; the output route needs none."""
    return refit or shape[0] > shape[1]


def output_side(shape: tuple[int, int]) -> bool:
    """Whether a layer of ``shape`` (out, in) is whitened in output space: out ≤ in. Its statistic is then
    the Gram of its outputs Σ_t (W·x_t)(W·x_t)ᵀ = W·C·Wᵀ (out×out) rather than C (in×in)."""
    return shape[0] <= shape[1]


def _weigh_both(gram: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """Rᵀ·G·R (diag(√w)·G·diag(√w) for a vector factor)."""
    if factor is None:
        return gram
    if factor.dim() == 1:
        return gram * factor.unsqueeze(1) * factor.unsqueeze(0)
    return factor.T @ gram @ factor


def shrunk_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """(1 − s)·C + s·diag(C): each input channel keeps its own scale, the correlations between channels
    (which belong to the calibration text) count for 1 − s (C itself when s is 0)."""
    if not shrinkage:
        return gram
    shrunk = gram.double() * (1 - shrinkage)  # (in, in)
    shrunk.diagonal().copy_(gram.diagonal())
    return shrunk


def shrunk_output_gram(output_gram: torch.Tensor, weight: torch.Tensor, diagonal: torch.Tensor | None,
                       shrinkage: float) -> torch.Tensor:
    """W·((1 − s)·C + s·diag(C))·Wᵀ from the output Gram W·C·Wᵀ and diag(C), (out, out)."""
    if not shrinkage:
        return output_gram
    if diagonal is None:
        raise ValueError("shrinking an output Gram needs the diagonal of the input Gram")
    W = weight.double()
    return output_gram.double() * (1 - shrinkage) + shrinkage * (W * diagonal.double()) @ W.T


def _damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """C + damping·mean(diag C)·I (C itself when damping is 0)."""
    if not damping:
        return gram
    shifted = gram.clone()
    shifted.diagonal().add_(damping * float(gram.diagonal().mean()))
    return shifted


@torch.no_grad()
def aware_factors(weight: torch.Tensor, rank: int, gram: torch.Tensor | None = None, cross: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None, cholesky: torch.Tensor | None = None,
                  damping: float = 0.0, ridge: float = 0.0, input_damping: float = 0.0,
                  output_gram: torch.Tensor | None = None, input_shrinkage: float = 0.0,
                  input_diagonal: torch.Tensor | None = None) -> svdmath.Factors:
    """Rank-``rank`` factors minimising ‖Rᵀ·(B·A·X_cᵀ − W·X_dᵀ)‖_F with R·Rᵀ the output weighting.

    Args:
        weight: W, (out, in).
        gram: C = X_cᵀX_c of the inputs the factors will see, (in, in).
        cross: X_dᵀX_c with the dense inputs, (in, in); None means X_d = X_c (plain whitening).
        weights: per-output-channel weights w, (out,), or an output covariance F, (out, out);
            None means all ones.
        cholesky: L with L·Lᵀ = C when already computed (layers sharing inputs share it); used only
            where :func:`needs_cholesky` says so.
        damping: F + damping·mean(diag F)·I is factored (full covariances only).
        ridge: the refit's relative ridge (see :func:`refit_target`); 0 is the exact least squares.
        input_damping: C + input_damping·mean(diag C)·I is whitened against (0: C itself).
        output_gram: Σ_t (W·x_t)(W·x_t)ᵀ = W·C·Wᵀ, (out, out), in place of C for a layer with out ≤ in
            (the output route reads nothing else); not with ``cross`` or ``input_damping``.
        input_shrinkage: whiten against (1 − s)·C + s·diag(C) (:func:`shrunk_gram`); ``cholesky``, when
            given, is then the factor of that; with ``output_gram``, ``input_diagonal`` is diag(C).

    Returns:
        Factors (B, A) in ``weight.dtype``; singular values are those of Rᵀ·W*·L.

    Example:
        >>> f = aware_factors(W, 8, X.T @ X)       # SVD-LLM's closed form
        >>> (W - f.B @ f.A) @ X.T                   # the smallest rank-8 output error
    """
    target = weight.double()  # (out, in)
    if cross is not None:
        target = refit_target(target, gram.double(), cross.double(), ridge)
    R = row_factor(weights, damping)
    Y = _weigh_rows(target, R)  # Rᵀ·W*, (out, in)
    if output_gram is not None and cross is None and not input_damping:
        shrunk = shrunk_output_gram(output_gram, weight, input_diagonal, input_shrinkage)
        U, S, S_all = _top_eigen(_weigh_both(shrunk.double(), R), rank)
        S = torch.where(S > S[0] * 1e-7, S, torch.ones_like(S))  # see the output route below
        A = (U.T @ Y) / S.unsqueeze(1)  # Σ_r⁻¹·U_rᵀ·Rᵀ·W, (r, in)
    elif needs_cholesky(tuple(weight.shape), cross is not None):
        if cholesky is None or input_damping:
            cholesky = svdmath.cholesky_factor(_damped(shrunk_gram(gram, input_shrinkage), input_damping))[0]
        L = cholesky
        V, S_all = _input_space(Y, L, rank)  # V_r (in, r): right singular vectors of Rᵀ·W*·L
        A = torch.linalg.solve_triangular(L, V.T, upper=False, left=False)  # V_rᵀ L⁻¹, (r, in)
        return svdmath.Factors(_unweigh_rows(Y @ (L @ V), R).to(weight.dtype), A.to(weight.dtype), S_all.float(),
                               svdmath.energy_kept(S_all, rank))  # B = R⁻ᵀ·M·V_r = R⁻ᵀ·U_r·Σ_r, (out, r)
    else:
        U, S, S_all = _output_space(Y, _damped(shrunk_gram(gram.double(), input_shrinkage), input_damping), rank)
        S = torch.where(S > S[0] * 1e-7, S, torch.ones_like(S))  # a direction the inputs never excite: B·A
        A = (U.T @ Y) / S.unsqueeze(1)  # Σ_r⁻¹·U_rᵀ·Rᵀ·W, (r, in)    # keeps U·Uᵀ·Y there, as the Cholesky route
    B = _unweigh_rows(U * S, R)  # (out, r)
    return svdmath.Factors(B.to(weight.dtype), A.to(weight.dtype), S_all.float(), svdmath.energy_kept(S_all, rank))


def _input_space(Y: torch.Tensor, L: torch.Tensor, rank: int):
    """(V_r, σ_all) of M = Y·L (out > in) from the eigendecomposition of Mᵀ·M = Lᵀ·(Yᵀ·Y)·L (in×in), without
    forming M: the out×in products are Yᵀ·Y here and Y·(L·V_r) for B."""
    eigenvalues, Z = torch.linalg.eigh(L.T @ (Y.T @ Y) @ L)  # ascending; (in,), (in, in)
    return Z[:, -rank:].flip(1), eigenvalues.flip(0).clamp_min(0).sqrt()


def _output_space(Y: torch.Tensor, gram: torch.Tensor, rank: int):
    """(U_r, σ_r, σ_all) of Y·X from the eigendecomposition of Y·C·Yᵀ (out×out), descending."""
    return _top_eigen(Y @ gram @ Y.T, rank)


def _top_eigen(square: torch.Tensor, rank: int):
    """(U_r, σ_r, σ_all) of a PSD matrix G = M·Mᵀ: its top eigenvectors and the singular values of M."""
    eigenvalues, Z = torch.linalg.eigh(square)  # ascending; (out,), (out, out)
    singular = eigenvalues.flip(0).clamp_min(0).sqrt()
    return Z[:, -rank:].flip(1), singular[:rank], singular


def refit_target(W: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """W* = W·(cross + λI)·(C + λI)⁻¹: the dense outputs' least-squares map, shrunk towards W.

    λ = ``ridge``·mean(diag C) keeps the fit from chasing calibration noise when the inputs are
    wide for the number of calibration tokens (λ → ∞ gives back W).
    """
    lam = ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    L, _ = svdmath.cholesky_factor(gram + lam)
    return torch.cholesky_solve((cross + lam).T @ W.T, L).T  # (out, in)


@torch.no_grad()
def weighted_spectrum(weight: torch.Tensor, gram: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                      cholesky: torch.Tensor | None = None, damping: float = 0.0,
                      input_damping: float = 0.0, output_gram: torch.Tensor | None = None,
                      input_shrinkage: float = 0.0, input_diagonal: torch.Tensor | None = None) -> torch.Tensor:
    """σ_i² of Rᵀ·W·L (R from ``weights`` and ``damping`` as in :func:`aware_factors`), descending:
    the eigenvalues of Rᵀ·W·C·Wᵀ·R (out ≤ in; from ``output_gram`` = W·C·Wᵀ when given) or of
    Lᵀ·Wᵀ·R·Rᵀ·W·L (out > in)."""
    R = row_factor(weights, damping)
    if output_gram is not None and not input_damping:
        shrunk = shrunk_output_gram(output_gram, weight, input_diagonal, input_shrinkage)
        return torch.linalg.eigvalsh(_weigh_both(shrunk.double(), R)).flip(0).clamp_min(0)
    Y = _weigh_rows(weight.double(), R)  # (out, in)
    gram = _damped(shrunk_gram(gram.double(), input_shrinkage), input_damping)
    if not needs_cholesky(tuple(weight.shape)):
        square = Y @ gram @ Y.T  # (out, out)
    else:
        L = svdmath.cholesky_factor(gram)[0] if cholesky is None or input_damping else cholesky
        square = L.T @ (Y.T @ Y) @ L  # (in, in) = Mᵀ·M with M = Y·L, never formed
    return torch.linalg.eigvalsh(square).flip(0).clamp_min(0)
