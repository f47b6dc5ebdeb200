"""The calibrated pipeline: statistics → per-layer ranks → factors, by the config's method, block by block.

    gradient pass   when the method weighs its outputs by F, or a budget is allocated (gradient_pass.py):
                    each block's statistics become its layers' costs (or rule ranks) while it is loaded;
                    what the fit reads (F) is kept, on disk when large
    ranks           the budget allocated over all costs (methods/allocate.py), or the per-layer rule
    fit pass        block by block, each group of layers factored on its statistics (fit_pass.py)

One code path in memory (calibrate/block_source.ResidentBlocks), streamed from the shards
(stream/block_loader.BlockLoader) and over an encoder-decoder's two stacks. At any time it holds: the
model (or, streamed, one block), the calibration hidden states at the block being worked on (every
boundary's, spilled to disk when large, in the gradient pass), the statistics of the layers being worked
on, and what the gradient pass leaves for the fit (a cost vector per layer, and F, spilled when large).
"""
from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..calibrate.block_source import BlockSource
from ..calibrate.blocks import block_hidden
from ..calibrate.collectors import LayerStatistics, statistics_bytes
from ..calibrate.experts import isotropic_statistics, sparse_experts
from ..calibrate.spill import SPILL_BYTES, Spill
from ..calibrate.timing import StageTimer, peak_memory_mb
from ..core.experts import experts_by_matrix
from ..core.layers import dense_weight
from ..core.workers import layer_workers, ordered_map
from ..methods.allocate import allocate, allocate_within, total_cost
from ..methods.config import CompressConfig
from ..methods.ranks import SENSITIVITY, cost_limit, layer_cost, predicted_rise, rule_rank
from ..methods.results import CompressionReport
from .factoring import GroupFactoring
from .fit_pass import FitPass
from .gradient_pass import GradientPass
from .passes import PassPlan


def compress_calibrated(source: BlockSource, config: CompressConfig, tokens: torch.Tensor,
                        targets: dict[str, nn.Module], *, workers: int = 0, progress: bool = True,
                        on_block: Callable[[int], None] | None = None,
                        spill_folder: Path | None = None, rise_limit: float | None = None) -> CompressionReport:
    """Factor ``targets`` of ``source``'s model by a calibrated method, block by block (module docstring).

    Args:
        source: the model's blocks, in memory or read from the shards.
        config: a resolved calibrated method and its rank option (methods/config.resolve).
        tokens: calibration token ids, (samples, length).
        targets: the layers to factor, by name.
        workers: layers factored at once (0: auto, core/workers.py).
        on_block: called with each block's index once it is compressed.
        spill_folder: where what the gradient pass leaves for the fit goes when it is large (a temporary
            folder if None).
        rise_limit: with ``config.max_loss_rise``, the predicted loss rise the allocation may reach (default:
            ``max_loss_rise`` itself; pipelines/target.py passes a tighter one when the measured rise was over).

    Returns:
        The CompressionReport, with ``calibration`` (settings, sensitivity, peak memory, seconds, time split).
    """
    run = CalibratedRun(source, config, tokens, targets, workers, progress)
    run.rise_limit = config.max_loss_rise if rise_limit is None else rise_limit
    return run.run(on_block, spill_folder)


class CalibratedRun:
    """One calibrated run: its passes, what they hand each other and the report (module docstring)."""

    def __init__(self, source: BlockSource, config: CompressConfig, tokens: torch.Tensor,
                 targets: dict[str, nn.Module], workers: int, progress: bool):
        self.source, self.config, self.tokens, self.targets = source, config, tokens, targets
        self.workers, self.progress, self.timer = workers, progress, StageTimer()
        self.plan = PassPlan.of(config, experts=bool(experts_by_matrix(source.model, targets)))
        self.factoring = GroupFactoring(source.model, config, targets, workers, str(source.device), self.timer)
        self.costs, self.groups = {}, {}
        self.spill: Spill | None = None
        self.rise_limit: float | None = config.max_loss_rise

    def run(self, on_block, spill_folder) -> CompressionReport:
        start = time.perf_counter()
        with self.timer.stage("forward"):
            calls = self.source.calls(self.tokens, 0, outside=self.source.outside(self.targets))
        self.spill = Spill(self._too_large_to_keep(calls), spill_folder)
        wanted = {p: p.requires_grad for p in self.source.model.parameters()}
        self.source.model.requires_grad_(False)  # the backward needs activation gradients only, not weight gradients
        try:
            if self.plan.gradient_pass:
                GradientPass(self.source, self.tokens, self.targets, self.plan.gradient_pass, self._collect,
                             self.spill, self.timer, self.config.seed, self.progress).run(calls)
            if self.config.allocated:
                self.factoring.ranks.update(self._allocate())
            elif self.config.energy is None:  # a rank or ratio: known from the shapes, before any statistics
                self.factoring.ranks.update({name: rule_rank(self.config, dense_weight(module), None)
                                             for name, module in self.targets.items()})
            FitPass(self.source, self.tokens, self.targets, self.plan, self.factoring, self._kept, self.groups,
                    self.timer, self.progress, on_block, sparse_known=bool(self.plan.gradient_pass)).run(calls)
        finally:
            self.spill.close()
            for param, flag in wanted.items():
                param.requires_grad_(flag)
        return self._report(start)

    def _collect(self, modules: dict[str, nn.Module], stats: dict[str, LayerStatistics], groups) -> None:
        """Take one block's gradient-pass statistics (its weights still loaded): costs or rule ranks, groups,
        and what the fit reads, parked under the block's first target. Experts routed too few tokens get
        isotropic statistics first (calibrate/experts.py)."""
        model, key = self.source.model, next(iter(modules))
        sparse = sparse_experts(model, stats, list(modules), self.config.expert_min_tokens)
        self.factoring.sparse.update(sparse)
        stats = {**stats, **isotropic_statistics(model, stats, sparse)}
        self.groups[key] = groups
        kept = {f"{name}|{c.key}": stats[name][c.key] for name in modules for c in self.plan.kept
                if c.key in stats[name] and name not in sparse}
        self.spill.put(f"kept-{key}", kept)
        if self.config.allocated:
            shapes = [tuple(dense_weight(m).shape) for m in modules.values()]
            workers = layer_workers(self.workers, shapes, str(self.source.device))
            shrinkage = self.config.options.input_shrinkage
            with closing(ordered_map(lambda name: layer_cost(dense_weight(modules[name]), stats[name], shrinkage),
                                     list(modules), workers)) as found:
                self.costs.update(zip(modules, found))
        elif self.config.energy is not None:
            self.factoring.ranks.update({name: rule_rank(self.config, dense_weight(module), stats[name])
                                         for name, module in modules.items()})

    def _allocate(self) -> dict[str, int | None]:
        """The ranks of the budget, or of the loss target: the fewest parameters whose predicted rise stays
        under ``rise_limit`` (methods/ranks.predicted_rise)."""
        costs = {name: self.costs[name] for name in self.targets}  # in model order: ties go to the first
        if self.config.budget is not None:
            return allocate(costs, self.config.budget, self.config.allocation_max_keep)
        return allocate_within(costs, cost_limit(self.rise_limit, self._predicted_tokens()),
                               self.config.allocation_max_keep)

    def _predicted_tokens(self) -> int:
        """The tokens whose next-token loss the calibration sums: every position but each sequence's last."""
        return int(self.tokens.shape[0] * (self.tokens.shape[1] - 1))

    def _kept(self, key: str) -> dict[str, dict[str, torch.Tensor]]:
        """What the gradient pass left for the block whose first target is ``key``, per layer, taken once."""
        if not self.plan.gradient_pass or not self.plan.kept:
            return {}
        found: dict[str, dict[str, torch.Tensor]] = {}
        for flat, tensor in self.spill.take(f"kept-{key}").items():
            name, _, statistic = flat.rpartition("|")
            found.setdefault(name, {})[statistic] = tensor
        return found

    def _too_large_to_keep(self, calls: list) -> bool:
        """Whether the gradient pass's hidden states at every block boundary, or what it keeps for the fit,
        exceed SPILL_BYTES."""
        width = block_hidden(calls[0])[0].shape[-1]
        hidden = (len(self.source.blocks) + 1) * self.tokens.numel() * width * torch.finfo(self.source.dtype).bits // 8
        kept = sum(statistics_bytes([tuple(dense_weight(m).shape)], self.plan.kept) for m in self.targets.values())
        return max(hidden, kept) > SPILL_BYTES

    def _report(self, start: float) -> CompressionReport:
        """The CompressionReport of every target, with the calibration settings, costs and time split."""
        results = self.factoring.results
        report = CompressionReport(self.config, [results[n] for n in self.targets])
        report.calibration = {"samples": int(self.tokens.shape[0]), "length": int(self.tokens.shape[1]),
                              "tokens": int(self.tokens.numel()), "text": None,
                              "generated": 0,  # sequences the model wrote itself (set by the caller)
                              "sensitivity": SENSITIVITY if self.config.allocated else None,
                              "peak_memory_mb": round(peak_memory_mb(), 1),
                              "seconds": round(time.perf_counter() - start, 1),
                              "seconds_by_stage": self.timer.rounded()}
        if self.config.max_loss_rise is not None:
            ranks = {name: results[name].rank for name in self.targets}
            report.calibration["predicted_loss_rise"] = round(predicted_rise(
                total_cost(self.costs, ranks), self._predicted_tokens()), 6)
            report.calibration["predicted_loss_limit"] = round(self.rise_limit, 6)
        if self.factoring.sparse:  # experts factored from their weights: too few tokens routed to them
            report.calibration["sparse_experts"] = {"min_tokens": self.config.expert_min_tokens,
                                                    "tokens": dict(sorted(self.factoring.sparse.items()))}
        return report
