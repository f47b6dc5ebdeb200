"""The only code that swaps modules in a model."""
from __future__ import annotations

from torch import nn

from .layers import LowRankLinear, dense_weight
from .svd import Factors


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``name`` (a dotted path) is in ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def factor_module_(model: nn.Module, name: str, factors: Factors) -> LowRankLinear:
    """Replace the dense layer ``name`` by a LowRankLinear holding ``factors`` and its bias.

    The new module takes the dense weight's dtype and device.
    """
    dense = model.get_submodule(name)
    weight = dense_weight(dense)
    bias = getattr(dense, "bias", None)
    module = LowRankLinear.from_factors(factors.B.to(weight), factors.A.to(weight), bias)
    replace_module(model, name, module)
    return module
