"""The factoring step of the calibrated pipeline: a group of layers, its statistics and ranks in, factors
swapped in and each layer's result recorded; the group's layers on the worker pool (core/workers.py)."""
from __future__ import annotations

from contextlib import closing

import torch
from torch import nn

from ..calibrate.collectors import LayerStatistics
from ..calibrate.timing import StageTimer
from ..core import svd as svdmath
from ..core.layers import check_finite_float, dense_weight
from ..core.patch import factor_module_
from ..core.whitening import Whitening
from ..core.workers import layer_workers, ordered_map
from ..methods.config import CompressConfig
from ..methods.ranks import rule_rank
from ..methods.results import new_layer_result


class GroupFactoring:
    """Factors groups of layers of ``model`` by ``config``'s method and keeps each layer's result.

    ``ranks`` holds the ranks known before the fit (the budget's, or those the rule took from the gradient
    pass); a layer without one gets its rule rank from the statistics it is factored on. ``sparse`` holds
    the experts routed too few calibration tokens (→ tokens): they are factored from their weights.
    """

    def __init__(self, model: nn.Module, config: CompressConfig, targets: dict[str, nn.Module], workers: int,
                 device: str, timer: StageTimer):
        self.model, self.config, self.targets, self.timer = model, config, targets, timer
        self.workers, self.device = workers, device
        self.results = {name: new_layer_result(name, module) for name, module in targets.items()}
        self.ranks: dict[str, int | None] = {}
        self.sparse: dict[str, int] = {}

    def to_factor(self, names: list[str]) -> list[str]:
        """The layers of ``names`` the fit needs statistics for: all but those whose rank already says they stay
        dense (their result says why, now) and the experts factored from their weights."""
        return [name for name in names if name not in self.sparse and
                (name not in self.ranks or self._factored(name))]

    def factor(self, names: list[str], stats: dict[str, LayerStatistics]) -> None:
        """Factor ``names`` (layers reading one input, or any layers of one block) on ``stats`` and swap them in."""
        with self.timer.stage("factoring"):
            for name in names:
                if name not in self.ranks:
                    weight = dense_weight(self.targets[name])
                    own = _unit_statistics(weight) if name in self.sparse else stats.get(name)
                    self.ranks[name] = rule_rank(self.config, weight, own)
            todo = [name for name in names if self._factored(name)]
            shapes = [tuple(dense_weight(self.targets[name]).shape) for name in todo]
            workers = min(len(todo), layer_workers(self.workers, shapes, self.device)) or 1
            with closing(ordered_map(lambda name: self._factors(name, stats.get(name)), todo, workers)) as found:
                for name, factors in zip(todo, found):
                    factor_module_(self.model, name, factors)
                    self.results[name].rank, self.results[name].energy_kept = factors.rank, factors.energy_kept

    def _factored(self, name: str) -> bool:
        """Whether ``name`` gets factors; else its result says why it stays dense."""
        if name in self.sparse:
            self.results[name].note = (f"received {self.sparse[name]} calibration tokens (fewer than "
                                       f"expert_min_tokens {self.config.expert_min_tokens}): factored from its "
                                       f"weight spectrum")
        if self.ranks[name] is not None:
            return True
        self.results[name].note = ("left dense by the budget" if self.config.budget
                                   else "left dense by the loss target" if self.config.max_loss_rise
                                   else "its rank would save no parameters or pass max_keep; left dense")
        return False

    @torch.no_grad()
    def _factors(self, name: str, stats: LayerStatistics | None) -> svdmath.Factors:
        weight = dense_weight(self.targets[name])
        check_finite_float(name, weight)
        rank = min(self.ranks[name], min(weight.shape))
        if name in self.sparse:  # isotropic statistics: every activation-aware method gives the SVD of W
            return Whitening(weight, gram=torch.eye(weight.shape[1], dtype=torch.float64)).factors(rank)
        return self.config.record.factor(weight, rank, stats, self.config.options, solver=self.config.solver,
                                         seed=self.config.seed)


def _unit_statistics(weight: torch.Tensor) -> LayerStatistics:
    """C = I: the statistics for which a layer's whitened spectrum is that of its weight."""
    return LayerStatistics({"gram": torch.eye(weight.shape[1], dtype=torch.float64)}, 1)
