"""Which modules get factored: every nn.Linear / GPT-2 Conv1D but embeddings and lm_head."""
from __future__ import annotations

import re

from torch import nn

from ..errors import LoraCompressError
from .layers import is_conv1d


def is_factorable(module: nn.Module) -> bool:
    """A dense 2-D linear map that this library knows how to factor."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _output_embedding_names(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_targets(model: nn.Module, include: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Targeted modules by fully qualified name, in model order.

    Default: every nn.Linear and Conv1D except the output embedding (lm_head) and anything
    sharing a weight with an embedding. ``include`` keeps only names matching any regex
    (``re.search``); ``exclude`` then drops names matching any regex.

    Raises:
        LoraCompressError: a pattern is not a valid regex or matches no candidate module.
    """
    skip = _output_embedding_names(model) | _tied_to_embeddings(model)
    candidates = {name: module for name, module in model.named_modules()
                  if name and is_factorable(module) and name not in skip}
    include_res = [_compile(p, "--include") for p in include]
    exclude_res = [_compile(p, "--exclude") for p in exclude]
    for flag, patterns in (("--include", include_res), ("--exclude", exclude_res)):
        for pattern in patterns:
            if not any(pattern.search(name) for name in candidates):
                raise LoraCompressError(
                    f"{flag} {pattern.pattern!r} matches no linear module; run "
                    f"`lora-compress inspect MODEL` to list module names")
    if include_res:
        candidates = {n: m for n, m in candidates.items() if any(p.search(n) for p in include_res)}
    targets = {n: m for n, m in candidates.items() if not any(p.search(n) for p in exclude_res)}
    if not targets:
        raise LoraCompressError("no linear module is left to compress; loosen --include/--exclude")
    return targets


def _tied_to_embeddings(model: nn.Module) -> set[str]:
    """Names of linear modules whose weight is an embedding's weight (tied, left alone)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name for name, module in model.named_modules()
            if is_factorable(module) and id(module.weight) in embedding_weights}


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise LoraCompressError(f"{flag} {pattern!r} is not a valid regular expression ({error}); "
                                f"fix the pattern") from None
