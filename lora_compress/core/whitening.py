"""Pure tensor math of activation-aware factoring: whitening on both sides of W, in one object.

    minimise ‖Rᵀ·(B·A·X_cᵀ − W*·X_dᵀ)‖_F  over rank-r B (out×r), A (r×in)

    C = X_cᵀX_c                    the inputs the factors will see (float64 sums)
    R·Rᵀ = output weighting        per-channel weights w (R = diag √w) or a covariance F (damped)
    W* = W                         or, with the dense inputs' cross-Gram, the least-squares refit

The best rank-r map keeps the top-r left singular directions of Y = Rᵀ·W*·X_cᵀ, the eigenvectors U_r
of Y·Yᵀ = Rᵀ·W*·C·W*ᵀ·R, and projects W* onto them: B·A = R⁻ᵀ·U_r·U_rᵀ·Rᵀ·W*. :class:`Whitening` builds
one symmetric matrix per layer, on the smaller side of W, and decomposes it once: its eigenvalues are
the squared singular values σ_i² of Rᵀ·W*·L (the spectrum the budget allocates with, that
``inspect --spectrum`` prints and the energy rule reads) and its eigenvectors give the factors
(SVD-LLM's, up to rounding):

    out ≤ in   output space: Rᵀ·W·C·Wᵀ·R (out×out), from the output Gram W·C·Wᵀ when given: no Cholesky
               of C, no ridge, C may be singular.   B = R⁻ᵀ·U_r·Σ_r,  A = Σ_r⁻¹·U_rᵀ·Rᵀ·W
    out > in   input space: C = L·Lᵀ (Cholesky), Lᵀ·Wᵀ·R·Rᵀ·W·L (in×in), never forming W·L.
               B = R⁻ᵀ·(Rᵀ·W·L)·V_r = R⁻ᵀ·U_r·Σ_r,  A = V_rᵀ·L⁻¹

The truncation loss Σ_{i>r} σ_i² is the error above, so the spectrum doubles as a cost per rank.
Tensors in, tensors out: the methods (lora_compress.methods) choose the knobs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

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


@dataclass
class Whitening:
    """Rᵀ·W*·L of one layer, decomposed once for its spectrum (σ_i², descending) and its rank-r factors.

    Args:
        weight: W, (out, in).
        gram: C = X_cᵀX_c of the inputs the factors will see, (in, in).
        output_gram: Σ_t (W·x_t)(W·x_t)ᵀ = W·C·Wᵀ, (out, out), in place of C for a layer with out ≤ in
            (the output route reads nothing else); not with ``cross``.
        input_diagonal: diag(C), (in,): shrinks an output Gram (``shrinkage``).
        weights: per-output-channel weights w, (out,), or an output covariance F, (out, out); None: all ones.
        damping: F + damping·mean(diag F)·I is factored (full covariances only).
        shrinkage: whiten against (1 − s)·C + s·diag(C) (:func:`shrunk_gram`).
        cross: X_dᵀX_c with the dense inputs, (in, in): fit the least-squares refit W* (:func:`refit_target`).
        ridge: the refit's relative ridge; 0 is the exact least squares.
        cholesky: L with L·Lᵀ = the shrunk C, or a function making it (layers sharing inputs share it).

    Example:
        >>> Whitening(W, X.T @ X).factors(8)            # SVD-LLM's closed form: the smallest rank-8 ‖(W − B·A)·Xᵀ‖
        >>> Whitening(W, X.T @ X).spectrum()[8:].sum()   # its squared error
    """

    weight: torch.Tensor
    gram: torch.Tensor | None = None
    output_gram: torch.Tensor | None = None
    input_diagonal: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    damping: float = 0.0
    shrinkage: float = 0.0
    cross: torch.Tensor | None = None
    ridge: float = 0.0
    cholesky: torch.Tensor | Callable[[], torch.Tensor] | None = None
    _square: torch.Tensor | None = field(default=None, repr=False)
    _row: torch.Tensor | None = field(default=None, repr=False)

    @property
    def route(self) -> str:
        """``output`` (from the output Gram), ``input`` (the Cholesky of C: tall layers, the refit) or
        ``output-from-input`` (Y·C·Yᵀ: a wide layer given its input Gram)."""
        if self.output_gram is not None and self.cross is None:
            return "output"
        if self.cross is not None or self.weight.shape[0] > self.weight.shape[1]:
            return "input"
        return "output-from-input"

    @torch.no_grad()
    def spectrum(self) -> torch.Tensor:
        """σ_i² of Rᵀ·W*·L, descending (float64)."""
        return torch.linalg.eigvalsh(self.square()).flip(0).clamp_min(0)

    @torch.no_grad()
    def factors(self, rank: int) -> svdmath.Factors:
        """Rank-``rank`` factors minimising ‖Rᵀ·(B·A·X_cᵀ − W*·X_dᵀ)‖_F, in ``weight.dtype``; their singular
        values are those of Rᵀ·W*·L."""
        Y = self.weighted()  # Rᵀ·W*, (out, in)
        eigenvalues, Z = torch.linalg.eigh(self.square())  # ascending
        singular = eigenvalues.flip(0).clamp_min(0).sqrt()
        top = Z[:, -rank:].flip(1)  # (side, r), best first
        if self.route == "input":
            L = self._cholesky()
            A = torch.linalg.solve_triangular(L, top.T, upper=False, left=False)  # V_rᵀ L⁻¹, (r, in)
            B = _unweigh_rows(Y @ (L @ top), self.row())  # R⁻ᵀ·M·V_r = R⁻ᵀ·U_r·Σ_r, (out, r)
        else:
            S = singular[:rank]
            S = torch.where(S > S[0] * 1e-7, S, torch.ones_like(S))  # a direction the inputs never excite: B·A
            A = (top.T @ Y) / S.unsqueeze(1)  # Σ_r⁻¹·U_rᵀ·Rᵀ·W, (r, in)  # keeps U·Uᵀ·Y there, as the input route
            B = _unweigh_rows(top * S, self.row())  # (out, r)
        return svdmath.Factors(B.to(self.weight.dtype), A.to(self.weight.dtype), singular.float(),
                               svdmath.energy_kept(singular, rank))

    def row(self) -> torch.Tensor | None:
        """R (:func:`row_factor`), made once."""
        if self._row is None and self.weights is not None:
            self._row = row_factor(self.weights, self.damping)
        return self._row

    def weighted(self) -> torch.Tensor:
        """Y = Rᵀ·W*, (out, in) float64; W* is W, or the refit's least-squares target."""
        target = self.weight.double()  # (out, in)
        if self.cross is not None:
            target = refit_target(target, self.gram.double(), self.cross.double(), self.ridge)
        return _weigh_rows(target, self.row())

    def square(self) -> torch.Tensor:
        """The symmetric matrix whose eigenvalues are the σ_i² of Rᵀ·W*·L (module docstring), made once."""
        if self._square is None:
            self._square = self._make_square()
        return self._square

    def _make_square(self) -> torch.Tensor:
        if self.route == "output":
            shrunk = shrunk_output_gram(self.output_gram, self.weight, self.input_diagonal, self.shrinkage)
            return _weigh_both(shrunk.double(), self.row())  # (out, out)
        Y = self.weighted()  # (out, in)
        if self.route == "input":
            L = self._cholesky()
            return L.T @ (Y.T @ Y) @ L  # (in, in) = Mᵀ·M with M = Y·L, never formed
        return Y @ shrunk_gram(self.gram.double(), self.shrinkage) @ Y.T  # (out, out)

    def _cholesky(self) -> torch.Tensor:
        if callable(self.cholesky):
            self.cholesky = self.cholesky()
        if self.cholesky is None:
            self.cholesky = input_cholesky(self.gram, self.shrinkage)
        return self.cholesky


def input_cholesky(gram: torch.Tensor, shrinkage: float = 0.0) -> torch.Tensor:
    """L with L·Lᵀ = (1 − s)·C + s·diag(C) (a ridge grown only as far as C needs it)."""
    return svdmath.cholesky_factor(shrunk_gram(gram, shrinkage))[0]


def refit_target(W: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, ridge: float) -> torch.Tensor:
    """W* = W·(cross + λI)·(C + λI)⁻¹: the dense outputs' least-squares map, shrunk towards W.

    λ = ``ridge``·mean(diag C) keeps the fit from chasing calibration noise when the inputs are
    wide for the number of calibration tokens (λ → ∞ gives back W).
    """
    lam = ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    L, _ = svdmath.cholesky_factor(gram + lam)
    return torch.cholesky_solve((cross + lam).T @ W.T, L).T  # (out, in)
