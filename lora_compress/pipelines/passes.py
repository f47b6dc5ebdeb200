"""Which statistics each pass of the calibrated pipeline gathers: read off the method's declarations and
the rank rule, once, by the pipeline and the memory plan alike (so the estimate cannot drift).

    gradient pass   (a backward over the dense model) the method's gradient statistics, the budget's
                    costs (COST_STATISTICS), the energy rule's spectra, the experts' rows
    fit pass        (block by block, per group of layers) the method's forward statistics, on the
                    compressed model's own inputs (closed loop) or the dense model's (open loop)
    kept            what the fit reads from the gradient pass: the method's gradient statistics
"""
from __future__ import annotations

from dataclasses import dataclass

from ..calibrate.collectors import Collector
from ..calibrate.experts import EXPERT_STATISTICS
from ..methods.config import CompressConfig
from ..methods.ranks import COST_STATISTICS, RULE_STATISTICS


def _unique(*groups) -> tuple[Collector, ...]:
    return tuple(dict.fromkeys(collector for group in groups for collector in group))


@dataclass(frozen=True)
class PassPlan:
    """The statistics of each pass of a calibrated run (module docstring)."""

    gradient_pass: tuple[Collector, ...]  # empty: no gradient pass
    fit_pass: tuple[Collector, ...]
    kept: tuple[Collector, ...]
    closed_loop: bool
    dense_stream: bool

    @classmethod
    def of(cls, config: CompressConfig, experts: bool = False) -> "PassPlan":
        """The passes of ``config`` (a resolved, calibrated method); ``experts``: the model has expert targets."""
        method = config.record
        extra = EXPERT_STATISTICS if experts else ()
        energy = RULE_STATISTICS if config.energy is not None else ()
        gradient = ()
        if config.needs_gradients:
            gradient = _unique(COST_STATISTICS if config.allocated else (), energy,
                               method.gradient_statistics, extra)
        fit = _unique(method.forward_statistics, extra, () if gradient else energy)
        return cls(gradient, fit, method.gradient_statistics, method.closed_loop, method.dense_stream)
