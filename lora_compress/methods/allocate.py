"""A parameter budget → one rank per layer, spending parameters where they hurt least.

Each layer l offers options: rank r (r·(m+n) parameters, cost ``tail_l[r]`` = Σ_{i>r} σ_i² of
its sensitivity-weighted whitened weight) or staying dense (m·n parameters, cost 0). The costs
share one scale (an estimate of the loss increase), so they can be traded across layers.

We minimise Σ cost subject to Σ params ≤ budget by Lagrangian relaxation (each layer picks
argmin cost + λ·params; λ found by bisection), then spend what is left greedily on the
step with the best cost drop per parameter that still fits. A layer may stay dense or be
cut hard. The one allocator: ``compress --budget`` spends it on factors that replace the layers,
``extract --budget`` on adapters that add to them (rank 0 allowed, no dense option); the budget means
the same in both, a fraction of the targeted layers' dense parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import OptionError
from ..core.svd import max_factored_rank


@dataclass(frozen=True)
class LayerCost:
    """The cost of cutting one layer to each rank."""

    shape: tuple[int, int]  # (out, in)
    tail: torch.Tensor  # (k+1,) float64: tail[r] = Σ_{i>r} σ_i², r = 0..k

    @classmethod
    def from_spectrum(cls, shape: tuple[int, int], power: torch.Tensor) -> "LayerCost":
        """From the squared singular values σ_i² (any order)."""
        power = power.double().clamp_min(0).sort(descending=True).values
        tail = torch.cat([power.flip(0).cumsum(0).flip(0), power.new_zeros(1)])  # (k+1,)
        return cls(tuple(shape), tail)

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def max_rank(self, max_keep: float = 1.0, dense: bool = True) -> int:
        """Largest rank worth factoring (see svd.max_factored_rank; above it the layer stays dense), or,
        without a ``dense`` option, every rank the spectrum has."""
        if not dense:
            return len(self.tail) - 1
        return max(1, min(max_factored_rank(*self.shape, max_keep), len(self.tail) - 1))

    def params(self, rank: int | None) -> int:
        return self.dense_params if rank is None else rank * sum(self.shape)

    def cost(self, rank: int | None) -> float:
        return 0.0 if rank is None else float(self.tail[rank])


def smallest_budget(costs: dict[str, LayerCost]) -> float:
    """The smallest feasible budget fraction: rank 1 in every layer."""
    dense = sum(c.dense_params for c in costs.values())
    return sum(c.params(1) for c in costs.values()) / dense


def allocate(costs: dict[str, LayerCost], budget: float, max_keep: float = 1.0,
             adapters: bool = False) -> dict[str, int | None]:
    """Ranks (None = dense) whose weights total at most ``budget`` × the dense weights.

    Args:
        costs: per layer, the cost of each rank on a common scale.
        budget: fraction of the layers' dense weight parameters to keep, in (0, 1].
        max_keep: a layer is either dense or factored at a rank holding at most this fraction of
            its parameters (factored layers above it are slower than dense ones; methods/config.py).
        adapters: the ranks of adapters added to the layers (``extract``): rank 0 (no adapter) is an
            option, staying dense is not, and any rank up to the full spectrum may be chosen.

    Returns:
        name → rank, or None for layers left dense.

    Raises:
        OptionError: the budget is too small for rank 1 everywhere.

    Example:
        >>> ranks = allocate({"a": LayerCost.from_spectrum((8, 8), s2)}, 0.5)
    """
    limit = math.floor(budget * sum(c.dense_params for c in costs.values()))
    lowest = 0 if adapters else 1
    if sum(c.params(lowest) for c in costs.values()) > limit:
        smallest = math.ceil(smallest_budget(costs) * 1000) / 1000
        raise OptionError(f"{{budget}} {budget} would leave some layer at rank 0; the smallest feasible "
                          f"budget is {smallest}; pass {{budget}} {smallest} or more")
    top = {name: cost.max_rank(max_keep, dense=not adapters) for name, cost in costs.items()}
    ranks = _relaxed(costs, limit, top, lowest, not adapters)
    return _fill(costs, ranks, limit, top, not adapters)


def _choose(cost: LayerCost, lam: float, top: int, lowest: int, dense: bool) -> int | None:
    ranks = torch.arange(lowest, top + 1)
    totals = cost.tail[lowest: top + 1] + lam * ranks.double() * sum(cost.shape)
    best = int(torch.argmin(totals)) + lowest
    return None if dense and lam * cost.dense_params <= float(totals[best - lowest]) else best


def _relaxed(costs: dict[str, LayerCost], limit: int, top: dict[str, int], lowest: int,
             dense: bool) -> dict[str, int | None]:
    """The Lagrangian choice for the smallest λ (bisection in log space) that fits ``limit``."""
    def pick(lam):
        return {name: _choose(cost, lam, top[name], lowest, dense) for name, cost in costs.items()}

    def total(ranks):
        return sum(costs[n].params(r) for n, r in ranks.items())

    scale = max(float(c.tail[0]) for c in costs.values()) or 1.0
    low, high = -40.0, 40.0  # log10 of λ relative to the largest layer energy
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (low, mid) if total(pick(scale * 10 ** mid)) <= limit else (mid, high)
    return pick(scale * 10 ** high)


def _fill(costs: dict[str, LayerCost], ranks: dict[str, int | None], limit: int,
          top: dict[str, int], dense: bool) -> dict[str, int | None]:
    """Spend the parameters left over: best cost drop per parameter first, while a step fits."""
    ranks = dict(ranks)
    spare = limit - sum(costs[n].params(r) for n, r in ranks.items())
    while True:
        best, best_gain = None, 0.0
        for name, rank in ranks.items():
            if rank is None:
                continue
            cost = costs[name]
            steps = [(rank + 1, cost.params(rank + 1))] if rank < top[name] else []
            if dense:
                steps.append((None, cost.dense_params))
            for new_rank, new_params in steps:
                extra = new_params - cost.params(rank)
                if 0 < extra <= spare:
                    gain = (cost.cost(rank) - cost.cost(new_rank)) / extra
                    if best is None or gain > best_gain:
                        best, best_gain = (name, new_rank, extra), gain
        if best is None:
            return ranks
        ranks[best[0]] = best[1]
        spare -= best[2]


def total_cost(costs: dict[str, LayerCost], ranks: dict[str, int | None]) -> float:
    """Σ of each layer's cost at its rank (0 for a layer left dense)."""
    return sum(costs[name].cost(rank) for name, rank in ranks.items())


def allocate_within(costs: dict[str, LayerCost], max_cost: float, max_keep: float = 1.0,
                    tolerance: float = 1e-4) -> dict[str, int | None]:
    """The fewest parameters whose total cost stays at most ``max_cost``: the smallest budget fraction (found by
    bisection to ``tolerance``) for which :func:`allocate` (least cost for a budget) meets it.

    Everything dense (cost 0) always meets it; rank 1 everywhere is the smallest model there is.

    Example:
        >>> ranks = allocate_within(costs, max_cost=0.25 * sum(float(c.tail[0]) for c in costs.values()))
    """
    low = smallest_budget(costs)
    ranks = allocate(costs, low, max_keep)
    if total_cost(costs, ranks) <= max_cost:
        return ranks
    high = 1.0
    best = allocate(costs, high, max_keep)
    while high - low > tolerance:
        mid = (low + high) / 2
        found = allocate(costs, mid, max_keep)
        if total_cost(costs, found) <= max_cost:
            high, best = mid, found
        else:
            low = mid
    return best
