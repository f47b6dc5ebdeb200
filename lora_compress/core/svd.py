"""Pure tensor math: truncated SVD of a weight into LoRA-style factors.

    W (out×in)  ≈  lora_B (out×r)  ·  lora_A (r×in)

Scale convention: Σ goes into B (``B = U_r Σ_r``, ``A = V_rᵀ``), so A has orthonormal rows.
Activation-aware factors (SVD-LLM's whitening and its two-sided form) are core/whitening.py's.

Nothing here knows about nn.Module: tensors in, tensors out, computed in float32 or
float64 under ``torch.no_grad()`` and cast back by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .precision import bf16_is_fast

SVD_METHODS = ("auto", "full", "randomized", "gram")
OVERSAMPLE = 16  # extra random directions of the randomized SVD (Halko et al.: p ≥ 10)
POWER_ITERS = 5  # power iterations (p 16 with 5 iterations: the error of p 32 with 4, 5% faster)
AUTO_FRACTION = 0.5  # auto: randomized while rank + OVERSAMPLE < this fraction of min(out, in), else Gram/eigh
BF16_RANGE = 2.0 ** 9  # largest σ₁²/σ_r² for which the Gram matrix may be rounded to bf16
CHOLESKY_QR_LIMIT = 100.0  # estimated condition above which a basis is orthonormalised by Householder QR
RANDOMIZED_TOLERANCE = 0.01  # stated bound: randomized truncation error ≤ (1 + this) × full SVD's


@dataclass(frozen=True)
class Factors:
    """A rank-r factorisation ``W ≈ B·A`` and what the truncation kept."""

    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)
    singular_values: torch.Tensor  # (k,) all σ of W (or of W·L when whitened), descending
    energy_kept: float  # Σ_{i≤r} σ_i² / Σ σ_i²

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factors hold fewer parameters than the dense matrix.

    r·(m+n) < m·n  ⇔  r < m·n/(m+n).
    """
    m, n = out_features, in_features
    return math.ceil(m * n / (m + n)) - 1


def max_factored_rank(out_features: int, in_features: int, max_keep: float = 1.0) -> int:
    """Largest rank worth factoring: below break-even, and holding at most ``max_keep`` of the
    dense parameters (a factored layer does r·(m+n) multiply-adds per token against m·n, so
    ``max_keep`` also bounds its share of the dense layer's FLOPs)."""
    return min(break_even_rank(out_features, in_features), rank_for_ratio(out_features, in_features, max_keep))


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank that keeps a fraction ``ratio`` of the matrix's parameters: floor(p·m·n/(m+n))."""
    m, n = out_features, in_features
    return int(math.floor(ratio * m * n / (m + n) + 1e-9))


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose σ² sum reaches fraction ``energy`` of the total."""
    power = singular_values.double().pow(2)
    cumulative = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return min(int(torch.searchsorted(cumulative, energy - 1e-12).item()) + 1, len(power))


def energy_kept(singular_values: torch.Tensor, rank: int) -> float:
    """Fraction of Σσ² kept by the top ``rank`` singular values."""
    power = singular_values.double().pow(2)
    return float(power[:rank].sum() / power.sum().clamp_min(1e-300))


def cholesky_factor(gram: torch.Tensor, initial_ridge: float = 1e-6, max_tries: int = 12):
    """Lower-triangular L with ``L Lᵀ = gram + λ·mean(diag)·I``, growing λ until it works.

    Returns ``(L, ridge)``; ``ridge`` is the relative λ used (0.0 when none was needed).
    """
    gram = gram.double()
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    ridge = 0.0
    for _ in range(max_tries):
        shifted = gram if ridge == 0.0 else gram.clone()  # one copy at most: in² floats, 0.6 GB for in = 8,960
        if ridge:
            shifted.diagonal().add_(ridge * scale)
        L, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return L, ridge
        ridge = initial_ridge if ridge == 0.0 else ridge * 10
    raise ValueError("calibration Gram matrix is not positive definite even with a ridge")


def _full_svd(matrix: torch.Tensor):
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    return U, S, Vh


def _wide(solver):
    """Run ``solver`` (returning ``U, S, Vh, ...``) on the wide orientation (m ≤ n) and transpose back."""
    def oriented(matrix: torch.Tensor, *args):
        if matrix.shape[0] <= matrix.shape[1]:
            return solver(matrix, *args)
        found = solver(matrix.T, *args)
        if found is None:
            return None
        U, S, Vh, *rest = found
        return (Vh.T, S, U.T, *rest)
    return oriented


@_wide
def _gram_eigh_svd(matrix: torch.Tensor, rank: int, total: torch.Tensor):
    """Top-``rank`` SVD from the eigendecomposition of the small Gram matrix G = M·Mᵀ (m×m, m ≤ n).

    One m²n product and one m×m ``eigh`` instead of an SVD of M: 2-3× faster than the full SVD
    at every rank. σ_i is the norm of row i of U_rᵀ·M, so B·A = U_r U_rᵀ M holds exactly. Returns
    ``(U_r, S_r, Vh_r, S_all)`` with the rest of the spectrum from G's eigenvalues, or None when the
    truncation error is small enough for G's rounding (eps·σ₁²) to matter.
    """
    eigenvalues, Z = torch.linalg.eigh(matrix @ matrix.T)  # ascending
    U, S, Vh = _project(Z[:, -rank:].flip(1), matrix)  # U: (m, r)
    if _gram_too_coarse(total, S, matrix.dtype):
        return None
    rest = eigenvalues[:-rank].flip(0).clamp_min(0).sqrt()
    return U, S, Vh, torch.cat([S, rest])


def _project(basis: torch.Tensor, matrix: torch.Tensor):
    """``(U, S, Vh)`` with U = ``basis`` (orthonormal columns, m×k, best first; re-sorted by σ where
    rounding swapped two) and S·Vh = Uᵀ·M, in the basis's precision (Uᵀ·M is computed in
    ``matrix``'s: a bf16 copy of M adds ≤ 2⁻⁹·‖M‖ of error orthogonal to the truncation error,
    negligible where _gram_too_coarse allows bf16)."""
    P = (basis.T.to(matrix.dtype) @ matrix).to(basis.dtype)  # (k, n) = Σ Vᵀ
    S = P.norm(dim=1)
    if not bool((S[:-1] >= S[1:]).all()):  # eigenvectors come in descending order: usually sorted already
        S, order = S.sort(descending=True)
        basis, P = basis[:, order], P[order]
    return basis, S, P / S.clamp_min(torch.finfo(S.dtype).tiny)[:, None]


@_wide
def _randomized_svd(matrix: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int,
                    total: torch.Tensor):
    """Halko et al. randomized SVD with power iterations, seeded; returns the top ``k = rank + oversample``
    triplets.

    Each power iteration multiplies by M·Mᵀ. When forming the Gram G = M·Mᵀ once (m²n) is cheaper
    than 2(q+1) passes over M (m < 2(q+1)k, the usual case at LLM compression ranks), the
    iterations run on G (_gram_svd); else on M (_range). Both end in a Rayleigh–Ritz step.
    """
    m, n = matrix.shape
    k = min(rank + oversample, m)
    if m < 2 * (power_iters + 1) * k:
        for sketch in _sketch_dtypes(matrix):
            U, S, Vh = _gram_svd(matrix, k, power_iters, seed, sketch)
            if not _gram_too_coarse(total, S[:rank], sketch):
                return U, S, Vh
    Q = _range(matrix, k, power_iters, seed)  # (m, k)
    B = Q.T @ matrix  # (k, n)
    Z, S, Vh = _project(torch.linalg.eigh(B @ B.T)[1].flip(1), B)  # Rayleigh–Ritz: Z (k, k), Σ·Vᵀ = Zᵀ·B
    return Q @ Z, S, Vh


def _gram_svd(matrix: torch.Tensor, k: int, power_iters: int, seed: int, sketch: torch.dtype):
    """Subspace iteration on G = M·Mᵀ, formed and multiplied in ``sketch`` precision, then Rayleigh–Ritz:
    U = Q·Z with Z the eigenvectors of Qᵀ·G·Q (k×k), and Σ·Vᵀ = Uᵀ·M (_project).

    Orthonormalising (in the matrix's own precision) costs more than a product by G, so after the
    first product the remaining ``power_iters`` run two per orthonormalisation where one product
    grows the basis's condition by less than √``CHOLESKY_QR_LIMIT`` (a pair then stays within
    Cholesky-QR's reach, and bf16 keeps the weakest directions), else one. σ_i is the norm of row i
    of Uᵀ·M (not √ of an eigenvalue), so B·A = U_r U_rᵀ M holds and precision does not suffer from
    squaring M.
    """
    low = matrix.to(sketch)
    G = low @ low.T  # (m, m)
    Y, products, remaining = G @ _test_matrix(G.shape[0], k, seed, low), 1, power_iters
    while remaining:
        Q, condition = _orthonormal(Y.to(matrix.dtype))
        products = min(2 if condition ** (2 / products) < CHOLESKY_QR_LIMIT else 1, remaining)
        Y = Q.to(sketch)
        for _ in range(products):
            Y = G @ Y
        remaining -= products
    Q = torch.linalg.qr(Y.to(matrix.dtype))[0]  # (m, k), orthonormal in the matrix's precision
    low_Q = Q.to(sketch)
    Z = torch.linalg.eigh((low_Q.T @ (G @ low_Q)).to(matrix.dtype))[1].flip(1)  # (k, k), descending
    return _project(Q @ Z, low)


def _sketch_dtypes(matrix: torch.Tensor) -> list[torch.dtype]:
    """Gram/sketch precisions to try in turn: bfloat16 first for float32 input where bf16 matmuls are
    fast (3-4× the float32 rate on AVX512-BF16), then the matrix's own."""
    if matrix.dtype == torch.float32 and bf16_is_fast(matrix.device):
        return [torch.bfloat16, torch.float32]
    return [matrix.dtype]


def _gram_too_coarse(total: torch.Tensor, kept: torch.Tensor, sketch: torch.dtype) -> bool:
    """True when the Gram matrix's rounding could dominate the truncation error; a finer sketch (or
    the range found on M itself, or the full SVD) is used then. ``total`` is ‖M‖², ``kept`` the
    kept σ, descending.

    float32/64 Gram: ‖M − M_r‖² < 1000·eps·‖M‖² (rounding ≈ eps·σ₁²). bfloat16 Gram: its rounding,
    2⁻⁹·σ₁² per entry, must stay below the weakest kept direction (σ₁²/σ_r² < 2⁹; past that, outlier
    singular values cost over 1% on flat spectra: tests/test_svd.py), and the relative truncation
    error must be at least 20% (the rounding perturbs the subspace by ~2⁻⁸, which adds ~(2⁻⁸)² relative
    error: under 1% of the truncation error only when that error is large, as at LLM compression ranks).
    """
    if sketch == torch.bfloat16 and float(kept[0].square()) >= BF16_RANGE * float(kept[-1].square()):
        return True
    margin = 0.04 if sketch == torch.bfloat16 else 1000 * torch.finfo(sketch).eps
    return bool(total - kept.pow(2).sum() < margin * total)


@lru_cache(maxsize=8)
def _gaussian(rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Seeded CPU test matrix, cached: layers of one shape share it (same numbers on every device)."""
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _test_matrix(rows: int, cols: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    return _gaussian(rows, cols, seed, like.dtype).to(like.device)


def _orthonormal(Y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """An orthonormal basis of Y's columns, and Y's condition estimated from R's diagonal.

    Cholesky-QR (Y·R⁻¹ with RᵀR = YᵀY: one k×k Cholesky instead of a Householder QR) while that
    estimate is below ``CHOLESKY_QR_LIMIT`` (its loss of orthogonality, κ²·eps, stays under 1e-3);
    Householder QR otherwise, or when the Cholesky fails (including on NaN), with the condition
    reported as inf.
    """
    R, info = torch.linalg.cholesky_ex(Y.T @ Y, upper=True)
    if int(info) == 0:
        diagonal = R.diagonal().abs()
        condition = float(diagonal.max()) / max(float(diagonal.min()), torch.finfo(Y.dtype).tiny)
        if condition < CHOLESKY_QR_LIMIT:  # False on NaN
            return torch.linalg.solve_triangular(R, Y, upper=True, left=False), condition
    return torch.linalg.qr(Y)[0], math.inf


def _range(matrix: torch.Tensor, k: int, power_iters: int, seed: int) -> torch.Tensor:
    """Orthonormal Q (m×k) spanning ≈ the top-k left singular vectors of a wide ``matrix``."""
    Y = matrix @ _test_matrix(matrix.shape[1], k, seed, matrix)  # (m, k)
    for _ in range(power_iters):
        Y = matrix @ _orthonormal(matrix.T @ _orthonormal(Y)[0])[0]  # (m, k)
    return torch.linalg.qr(Y)[0]


def choose_svd(shape: tuple[int, int], rank: int, solver: str = "auto") -> str:
    """``auto`` picks the randomized SVD when ``rank + OVERSAMPLE`` is below ``AUTO_FRACTION`` of the
    smaller dimension, else the Gram/eigh solver (measured cross-over, see benchmarks/speed.md)."""
    if solver not in SVD_METHODS:
        raise ValueError(f"unknown SVD solver {solver!r}; choose one of {', '.join(SVD_METHODS)}")
    if solver != "auto":
        return solver
    return "randomized" if rank + OVERSAMPLE < AUTO_FRACTION * min(shape) else "gram"


def truncated_svd(matrix: torch.Tensor, rank: int, solver: str = "auto", seed: int = 0,
                  oversample: int | None = None, power_iters: int | None = None):
    """Top-``rank`` SVD of ``matrix`` as ``(U_r, S_r, Vh_r, S_all)``.

    ``S_all`` holds every singular value for the full and Gram solvers; for the randomized SVD it
    holds the top ``rank + oversample`` estimates plus, as its last entry, the energy of the rest
    (so energy fractions stay exact: Σσ² = ‖matrix‖_F²).

    The randomized SVD (defaults ``OVERSAMPLE``, ``POWER_ITERS``) keeps the truncation error
    ‖M − U_r S_r Vh_r‖_F within ``RANDOMIZED_TOLERANCE`` (1%) of the full SVD's on real LLM weights
    (SmolLM2-135M, all 210 layers at rank 128; tests/test_svd_speed.py checks the band) and on flat
    spectra with outlier singular values (tests/test_svd.py). The Gram solver is exact up to
    rounding and falls back to the full SVD where that rounding could matter.
    """
    method = choose_svd(tuple(matrix.shape), rank, solver)
    total = torch.linalg.vector_norm(matrix).square()  # ‖M‖² without a temporary the size of M
    if method == "gram":
        found = _gram_eigh_svd(matrix, rank, total)
        if found is not None:
            return found
    if method != "randomized":
        U, S, Vh = _full_svd(matrix)
        return U[:, :rank], S[:rank], Vh[:rank], S
    U, S, Vh = _randomized_svd(matrix, rank, OVERSAMPLE if oversample is None else oversample,
                               POWER_ITERS if power_iters is None else power_iters, seed, total)
    rest = (total - S.pow(2).sum()).clamp_min(0).sqrt()
    return U[:, :rank], S[:rank], Vh[:rank], torch.cat([S, rest.reshape(1)])


@torch.no_grad()
def factorize(weight: torch.Tensor, rank: int, *, solver: str = "auto", seed: int = 0,
              compute_dtype=torch.float32) -> Factors:
    """Best rank-``rank`` factors of ``weight`` (out×in) in Frobenius norm (activation-aware factors:
    core/whitening.Whitening).

    Args:
        weight: the dense matrix W, (out, in), any float dtype.
        rank: kept rank, 1 ≤ rank ≤ min(out, in).
        solver: ``full``, ``randomized``, ``gram`` or ``auto``.
        seed: seed of the randomized SVD.
        compute_dtype: float32 or float64; the factors come back in ``weight.dtype``.

    Returns:
        Factors with B (out×r) and A (r×in).

    Example:
        >>> W = torch.randn(10, 2) @ torch.randn(2, 10)
        >>> f = factorize(W, 2)
        >>> torch.allclose(f.B @ f.A, W, atol=1e-4)
        True
    """
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank {rank} is outside 1..{min(out_features, in_features)} for a "
                         f"{out_features}×{in_features} weight; choose a rank in that range")
    U, S, Vh, S_all = truncated_svd(weight.to(compute_dtype), rank, solver=solver, seed=seed)
    B = U * S  # (out, r)
    return Factors(B.to(weight.dtype), Vh.to(weight.dtype), S_all.float(), energy_kept(S_all, rank))


def truncate(factors: Factors, rank: int) -> Factors:
    """The top ``rank`` components of factors from a sorted (full) SVD."""
    return Factors(factors.B[:, :rank], factors.A[:rank], factors.singular_values,
                   energy_kept(factors.singular_values, rank))
