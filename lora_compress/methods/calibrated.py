"""The calibrated pass in memory: statistics → per-layer ranks → factors, by the config's method.

    open loop (whiten):      one pass of input Grams, then each layer factored on the dense inputs
    closed loop (sequential): block by block on the compressed model's own inputs (calibrate/closed_loop.py)

The output-gradient moments F (a backward pass) are collected when the method weights its outputs
by them or a budget is allocated (the cost is the Fisher-weighted truncation loss, methods/ranks.py).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.closed_loop import run_sequential
from ..calibrate.experts import fall_back_to_weights_
from ..calibrate.statistics import Statistics, collect_statistics, peak_memory_mb
from ..core import svd as svdmath
from ..core.layers import check_finite_float, dense_weight
from ..core.patch import factor_module_
from ..core.targets import find_targets
from ..errors import LoraCompressError
from .config import CompressConfig
from .ranks import SENSITIVITY, check_fixed_rank, choose_ranks
from .registry import LayerInputs
from .results import CompressionReport, new_layer_result


def check_calibration_length(model: nn.Module, tokens: torch.Tensor) -> None:
    """Refuse calibration sequences longer than the model's positions."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions and tokens.shape[1] > positions:
        raise LoraCompressError(f"--calib-len {tokens.shape[1]} is longer than the model's {positions} positions; "
                                f"pass --calib-len {positions} or less")


class Factorer:
    """Factors layers one at a time by the config's method and records what happened (in memory and streamed).

    ``ranks`` may be filled in as blocks come (streamed whitening picks ranks block by block).
    """

    def __init__(self, model: nn.Module, config: CompressConfig, targets: dict[str, nn.Module],
                 ranks: dict[str, int | None], stats: Statistics | None):
        self.model, self.config, self.targets, self.ranks, self.stats = model, config, targets, ranks, stats
        self.method = config.record
        self.results = {name: new_layer_result(name, module) for name, module in targets.items()}
        self.last = (None, None)  # (gram, its Cholesky factor): layers sharing inputs come in a row
        self.sparse: dict[str, int] = {}  # experts routed too few calibration tokens → tokens: factored from W

    def fall_back_(self, stats: Statistics, names) -> Statistics:
        """Experts among ``names`` routed fewer than ``expert_min_tokens`` get isotropic statistics
        (calibrate/experts.py) and are factored from their weights; returns ``stats``."""
        self.sparse.update(fall_back_to_weights_(stats, self.model, names, self.config.expert_min_tokens))
        return stats

    def __call__(self, name: str, gram: torch.Tensor, cross: torch.Tensor | None = None) -> None:
        rank, result = self.ranks[name], self.results[name]
        if rank is None:
            result.note = ("left dense by the budget" if self.config.budget
                           else "its rank would save no parameters or pass --max-keep; left dense")
            return
        weight = dense_weight(self.targets[name])
        check_finite_float(name, weight)
        fisher = self.stats.fisher.get(name) if self.method.gradients and self.stats else None
        if name in self.sparse:  # isotropic statistics: every method gives the truncated SVD of W
            gram, cross, fisher = torch.eye(weight.shape[1], dtype=torch.float64), None, None
            result.note = (f"received {self.sparse[name]} calibration tokens (fewer than --expert-min-tokens "
                           f"{self.config.expert_min_tokens}): factored from its weight spectrum")
        if gram is not self.last[0]:
            self.last = (gram, svdmath.cholesky_factor(gram)[0])
        inputs = LayerInputs(gram, self.last[1], cross if self.method.dense_stream else None, fisher)
        factors = self.method.factor(weight, min(rank, min(weight.shape)), inputs, self.config.options,
                                     svd=self.config.svd, seed=self.config.seed)
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
        if self.sparse:  # experts factored from their weights: too few tokens routed to them
            report.calibration["sparse_experts"] = {"min_tokens": config.expert_min_tokens,
                                                    "tokens": dict(sorted(self.sparse.items()))}
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
    start, method = time.perf_counter(), config.record
    check_calibration_length(model, tokens)
    targets = find_targets(model, config.include, config.exclude)
    check_fixed_rank(targets, config.rank)
    fisher = config.needs_gradients
    needs_stats = fisher or config.energy is not None or not method.closed_loop
    stats = collect_statistics(model, tokens, targets, fisher=fisher, progress=progress) if needs_stats else None
    factorer = Factorer(model, config, targets, {}, stats)
    if stats:
        factorer.fall_back_(stats, targets)
    factorer.ranks.update(choose_ranks(config, targets, stats))
    if method.closed_loop:
        if stats:
            stats.grams.clear()  # only the Fisher moments are used from here on
        rest = run_sequential(model, tokens, targets, factorer.group, progress, dense_stream=method.dense_stream)
        if rest:
            rest_stats = collect_statistics(model, tokens, rest, fisher=False, progress=False)
            for name in rest:
                factorer(name, rest_stats.gram(name))
    else:
        for name in tqdm(targets, desc="factoring", unit="layer", disable=not progress):
            factorer(name, stats.gram(name))
    return factorer.report(tokens, start)
