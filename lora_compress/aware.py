"""Activation-aware compression: calibration statistics → per-layer ranks → factors.

Methods (``CompressConfig.method``):

- ``whiten``: SVD-LLM's closed form. With C = XᵀX = L·Lᵀ of the dense model's inputs to the
  layer, SVD of W·L, B = U_r Σ_r, A = V_rᵀ L⁻¹: the rank-r minimiser of ‖(W − BA)Xᵀ‖_F.
- ``sequential`` (the default with calibration text): block by block, each layer is fitted on
  the inputs X_c that the already compressed layers produce (C = X_cᵀX_c), and its outputs are
  weighted by the output-gradient second moments F = Σ g·gᵀ (two-sided whitening, a
  Kronecker-factored curvature C ⊗ F: SVD of Rᵀ·W·L with R·Rᵀ = F + damping, B = R⁻ᵀ·U_r Σ_r),
  so the kept directions are those the loss is sensitive to. F is the full out×out covariance,
  shrunk towards its diagonal (calibrate.py), for layers with up to FULL_FISHER_MAX outputs, and
  its diagonal g (R = diag(√g)) for wider ones (benchmarks/quality.md: the full F beats the
  diagonal at every cut on SmolLM2 and MiniLM).
- ``sequential-refit``: as ``sequential``, and each layer is fitted to the dense model's outputs
  on the dense inputs X_d: the rank-r minimiser of ‖BA·X_cᵀ − W·X_dᵀ‖ is the whitened SVD of
  the least-squares target W* = W·(X_dᵀX_c)·C⁻¹ (shrunk towards W by a ridge). Measured worse
  than ``sequential`` on held-out text (it fits calibration noise); kept for comparison.

With ``budget``, ranks come from :func:`lora_compress.allocate.allocate` on a common-scale
cost: the Fisher-weighted whitened truncation loss Σ_{i>r} σ_i²(Rᵀ·W·L), an estimate of the
loss increase of cutting that layer to rank r.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import svd as svdmath
from .allocate import LayerCost, allocate
from .calibrate import FULL_FISHER_MAX, Statistics, collect_statistics, peak_memory_mb, run_sequential
from .compress import CompressConfig, CompressionReport, check_finite_float, layer_rank, new_layer_result
from .errors import LoraCompressError
from .layers import dense_weight
from .patch import factor_module_
from .targets import find_targets


@dataclass(frozen=True)
class Recipe:
    """How a calibrated method factors a layer."""

    sequential: bool  # compressed-stream inputs, block by block
    correct: bool  # fit the dense outputs (least-squares target W*), not W on the current inputs
    weighted: bool  # two-sided whitening with the output-gradient second moments


RECIPES = {
    "whiten": Recipe(sequential=False, correct=False, weighted=False),
    "sequential": Recipe(sequential=True, correct=False, weighted=True),
    "sequential-refit": Recipe(sequential=True, correct=True, weighted=True),  # measured worse: quality.md
}
CORRECTION_RIDGE = 0.1  # relative ridge of the closed-loop least-squares refit
FISHER_FLOOR = 1e-2  # diagonal weights g/mean(g) are floored here so no output channel is ignored
FISHER_DAMPING = 0.1  # full F: R·Rᵀ = F + this·mean(diag F)·I (SmolLM2 20%, F unshrunk: 0.001–0.1 beat the diagonal)


def channel_weights(fisher: torch.Tensor) -> torch.Tensor:
    """Output weights on a common scale: g/mean(g) floored at FISHER_FLOOR for a diagonal (out,),
    F/mean(diag F) for a full covariance (out, out) (damped when factored: _row_factor)."""
    fisher = fisher.double()
    if fisher.dim() == 2:
        return fisher / fisher.diagonal().mean().clamp_min(1e-300)
    return (fisher / fisher.mean().clamp_min(1e-300)).clamp_min(FISHER_FLOOR)


def _row_factor(weights: torch.Tensor | None) -> torch.Tensor | None:
    """R with R·Rᵀ the output weighting: √w for per-channel weights w (out,); for a covariance F
    (out, out), the lower Cholesky factor of F + FISHER_DAMPING·mean(diag F)·I."""
    if weights is None or weights.dim() == 1:
        return None if weights is None else weights.double().sqrt()
    F = weights.double()
    damping = FISHER_DAMPING * F.diagonal().mean() * torch.eye(len(F), dtype=F.dtype, device=F.device)
    return svdmath.cholesky_factor(F + damping)[0]


SENSITIVITY = ("fisher-weighted whitened truncation loss: sum over dropped i of sigma_i^2 of R^T·W·L, "
               f"R R^T = F + {FISHER_DAMPING:g}·mean(diag F)·I with F the mean output-gradient covariance of the "
               "calibration loss, shrunk towards its diagonal by the Ledoit-Wolf intensity (its diagonal g, "
               f"R = diag(sqrt(g)), for layers wider than {FULL_FISHER_MAX} outputs), L L^T = X^T X of the "
               "layer's calibration inputs")


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
                  weights: torch.Tensor | None = None, cholesky: torch.Tensor | None = None) -> svdmath.Factors:
    """Rank-``rank`` factors minimising ‖Rᵀ·(B·A·X_cᵀ − W·X_dᵀ)‖_F with R·Rᵀ the output weighting.

    Args:
        weight: W, (out, in).
        gram: C = X_cᵀX_c of the inputs the factors will see, (in, in).
        cross: X_dᵀX_c with the dense inputs, (in, in); None means X_d = X_c (plain whitening).
        weights: per-output-channel weights w, (out,), or an output covariance F, (out, out)
            (damped, see _row_factor); None means all ones.
        cholesky: L with L·Lᵀ = C when already computed (layers sharing inputs share it).

    Returns:
        Factors (B, A) in ``weight.dtype``; singular values are those of Rᵀ·W*·L.
    """
    L = svdmath.cholesky_factor(gram)[0] if cholesky is None else cholesky  # (in, in)
    target = weight.double()  # (out, in)
    if cross is not None:
        target = _refit_target(target, gram.double(), cross.double())
    R = _row_factor(weights)
    M = _weigh_rows(target, R) @ L  # (out, in)
    U, S, Vh, S_all = svdmath.truncated_svd(M, rank, svd="gram")  # float64 Gram/eigh: exact for these
    A = torch.linalg.solve_triangular(L, Vh, upper=False, left=False)  # V_rᵀ L⁻¹, (r, in)
    B = _unweigh_rows(U * S, R)  # (out, r)
    return svdmath.Factors(B.to(weight.dtype), A.to(weight.dtype), S_all.float(), svdmath.energy_kept(S_all, rank))


def _refit_target(W: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """W* = W·(cross + λI)·(C + λI)⁻¹: the dense outputs' least-squares map, shrunk towards W.

    λ = CORRECTION_RIDGE·mean(diag C) keeps the fit from chasing calibration noise when the
    inputs are wide for the number of calibration tokens (λ → ∞ gives back W).
    """
    ridge = CORRECTION_RIDGE * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    L, _ = svdmath.cholesky_factor(gram + ridge)
    return torch.cholesky_solve((cross + ridge).T @ W.T, L).T  # (out, in)


@torch.no_grad()
def weighted_spectrum(weight: torch.Tensor, gram: torch.Tensor, weights: torch.Tensor | None = None,
                      cholesky: torch.Tensor | None = None) -> torch.Tensor:
    """σ_i² of Rᵀ·W·L (R from ``weights`` as in aware_factors), descending, via the eigenvalues of
    the smaller Gram of that matrix."""
    L = svdmath.cholesky_factor(gram)[0] if cholesky is None else cholesky
    M = _weigh_rows(weight.double(), _row_factor(weights)) @ L  # (out, in)
    square = M @ M.T if M.shape[0] <= M.shape[1] else M.T @ M
    return torch.linalg.eigvalsh(square).flip(0).clamp_min(0)


def layer_costs(targets: dict[str, nn.Module], stats: Statistics) -> dict[str, LayerCost]:
    """The common-scale cost curve of every target (see SENSITIVITY)."""
    costs, factors = {}, {}
    for name, module in targets.items():
        weight, owner = dense_weight(module), stats.owner[name]
        fisher = stats.fisher.get(name)
        weights = None if fisher is None else fisher.double() / stats.tokens
        if owner not in factors:
            factors[owner] = svdmath.cholesky_factor(stats.grams[owner])[0]
        power = weighted_spectrum(weight, stats.gram(name), weights, cholesky=factors[owner])
        costs[name] = LayerCost.from_spectrum(tuple(weight.shape), power)
    return costs


def needs_fisher(config: CompressConfig) -> bool:
    """True when the method or the budget uses the output-gradient moments (a backward pass)."""
    return config.budget is not None or RECIPES[config.method].weighted


def rule_ranks(config: CompressConfig, targets: dict[str, nn.Module],
               stats: Statistics | None) -> dict[str, int | None]:
    """Rank per layer by the config's per-layer rule (None = dense); ``energy`` needs the layers' Grams."""
    ranks = {}
    for name, module in targets.items():
        shape = tuple(dense_weight(module).shape)
        spectrum = weighted_spectrum(dense_weight(module), stats.gram(name)).sqrt() if config.energy else None
        rank = layer_rank(config, shape, spectrum)
        ranks[name] = rank if rank <= config.rank_limit(shape) else None
    return ranks


def _plan(config: CompressConfig, targets: dict[str, nn.Module], stats: Statistics | None) -> dict[str, int | None]:
    """Rank per layer (None = dense): the budget allocation, or the config's per-layer rule."""
    if config.budget is not None:
        return allocate(layer_costs(targets, stats), config.budget, config.allocation_max_keep)
    return rule_ranks(config, targets, stats)


def check_calibration_length(model: nn.Module, tokens: torch.Tensor) -> None:
    """Refuse calibration sequences longer than the model's positions."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions and tokens.shape[1] > positions:
        raise LoraCompressError(f"--calib-len {tokens.shape[1]} is longer than the model's {positions} positions; "
                                f"pass --calib-len {positions} or less")


class Factorer:
    """Factors layers one at a time by a recipe and records what happened (in memory and streamed).

    ``ranks`` may be filled in as blocks come (streamed whitening picks ranks block by block).
    """

    def __init__(self, model, config, targets, ranks, stats):
        self.model, self.config, self.targets, self.ranks, self.stats = model, config, targets, ranks, stats
        self.recipe = RECIPES[config.method]
        self.results = {name: new_layer_result(name, module) for name, module in targets.items()}
        self.last = (None, None)  # (gram, its Cholesky factor): layers sharing inputs come in a row

    def __call__(self, name: str, gram: torch.Tensor, cross: torch.Tensor | None = None) -> None:
        rank, result = self.ranks[name], self.results[name]
        if rank is None:
            result.note = ("left dense by the budget" if self.config.budget
                           else "its rank would save no parameters or pass --max-keep; left dense")
            return
        weight = dense_weight(self.targets[name])
        check_finite_float(name, weight)
        fisher = self.stats.fisher.get(name) if self.recipe.weighted and self.stats else None
        weights = channel_weights(fisher) if fisher is not None else None
        if gram is not self.last[0]:
            self.last = (gram, svdmath.cholesky_factor(gram)[0])
        factors = aware_factors(weight, min(rank, min(weight.shape)), gram, cross if self.recipe.correct else None,
                                weights, cholesky=self.last[1])
        factor_module_(self.model, name, factors)
        result.rank, result.energy_kept = factors.rank, factors.energy_kept

    def group(self, names: list[str], gram: torch.Tensor, cross: torch.Tensor | None) -> None:
        for name in names:
            self(name, gram, cross)

    def report(self, tokens: torch.Tensor, start: float) -> CompressionReport:
        """The CompressionReport of every target, with the calibration settings and costs."""
        config = self.config
        report = CompressionReport(config, [self.results[n] for n in self.targets])
        report.calibration = {"samples": int(tokens.shape[0]), "length": int(tokens.shape[1]),
                              "tokens": int(tokens.numel()), "text": config.calib,
                              "sensitivity": SENSITIVITY if config.budget is not None else None,
                              "peak_memory_mb": round(peak_memory_mb(), 1),
                              "seconds": round(time.perf_counter() - start, 1)}
        return report


def compress_calibrated_(model: nn.Module, config: CompressConfig, tokens: torch.Tensor,
                         progress: bool = True) -> CompressionReport:
    """Factor the targeted layers of ``model`` in place by an activation-aware method.

    Args:
        model: a transformers model (causal LM or encoder).
        config: rank option (``budget`` allocates ranks per layer) and ``method``.
        tokens: calibration token ids, (samples, length).

    Returns:
        The CompressionReport, with ``calibration`` (settings, sensitivity, peak memory, seconds).
    """
    from .compress import _check_fixed_rank

    start, recipe = time.perf_counter(), RECIPES[config.method]
    check_calibration_length(model, tokens)
    targets = find_targets(model, config.include, config.exclude)
    _check_fixed_rank(targets, config.rank)
    fisher = needs_fisher(config)
    needs_stats = fisher or config.energy is not None or not recipe.sequential
    stats = collect_statistics(model, tokens, targets, fisher=fisher, progress=progress) if needs_stats else None
    ranks = _plan(config, targets, stats)
    factorer = Factorer(model, config, targets, ranks, stats)
    if recipe.sequential:
        if stats:
            stats.grams.clear()  # only the Fisher moments are used from here on
        rest = run_sequential(model, tokens, targets, factorer.group, progress, dense_stream=recipe.correct)
        if rest:
            rest_stats = collect_statistics(model, tokens, rest, fisher=False, progress=False)
            for name in rest:
                factorer(name, rest_stats.gram(name))
    else:
        for name in tqdm(targets, desc="factoring", unit="layer", disable=not progress):
            factorer(name, stats.gram(name))
    return factorer.report(tokens, start)
