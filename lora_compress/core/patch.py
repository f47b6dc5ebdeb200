"""The only code that swaps modules in a model."""
from __future__ import annotations

import weakref
from collections import Counter

from torch import nn

from .layers import LowRankLinear, dense_weight
from .pages import release_checkpoint_pages
from .svd import Factors


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``name`` (a dotted path) is in ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def factor_module_(model: nn.Module, name: str, factors: Factors) -> LowRankLinear:
    """Replace the dense layer ``name`` by a LowRankLinear holding ``factors`` and its bias.

    The new module takes the dense weight's dtype and device. The dense weight's pages are given
    back when it is a view of a mapped checkpoint file that no other tensor of ``model`` shares
    (core/pages.py): else the in-memory path would end holding the checkpoint and all its factors.
    """
    dense = model.get_submodule(name)
    weight = dense_weight(dense)
    bias = getattr(dense, "bias", None)
    users = _storage_users(model)  # counted before the first replacement
    module = LowRankLinear.from_factors(factors.B.to(weight), factors.A.to(weight), bias)
    replace_module(model, name, module)
    storage = weight.untyped_storage().data_ptr()
    users[storage] -= 1
    if users[storage] <= 0:  # no tied weight or sibling expert still reads these pages
        release_checkpoint_pages(weight)
    return module


_USERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _storage_users(model: nn.Module) -> Counter:
    """How many of ``model``'s tensors use each storage, counted at its first factored layer and
    decremented as layers are replaced (a count too high only keeps pages resident)."""
    if model not in _USERS:
        tensors = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
        _USERS[model] = Counter(tensor.untyped_storage().data_ptr() for _, tensor in tensors)
    return _USERS[model]
