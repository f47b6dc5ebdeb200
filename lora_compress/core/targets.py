"""Which modules get factored: every nn.Linear / GPT-2 Conv1D and every expert's matrix, but those
left dense by default (lm_head, tied weights, routers, task heads: core/left_out.py)."""
from __future__ import annotations

import re

from torch import nn

from ..errors import LoraCompressError
from .experts import fuse_experts_, fused_expert_names, unfuse_experts_
from .left_out import OPT_IN, is_factorable, left_out

__all__ = ["expose_experts_", "find_targets", "is_factorable", "left_out_reasons"]


def find_targets(model: nn.Module, include: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Targeted modules by fully qualified name, in model order.

    Default: every nn.Linear and Conv1D (and each expert's matrix once its experts are split,
    core/experts.py) except those :func:`lora_compress.core.left_out.left_out` names: the output
    embedding, weights tied to an embedding, routers and task heads. ``include`` keeps only names
    matching any regex (``re.search``), and brings back a router or task head whose whole name a
    pattern matches (``re.fullmatch``); ``exclude`` then drops names matching any regex.

    Raises:
        LoraCompressError: a pattern is not a valid regex or matches no candidate module.
    """
    return _select(model, include, exclude)[0]


def left_out_reasons(model: nn.Module, include: tuple[str, ...] = (),
                     exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """Every factorable module that :func:`find_targets` leaves out, name → why, in model order."""
    return _select(model, include, exclude)[1]


def expose_experts_(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> list[str]:
    """Split the fused experts modules that hold a target into one module per expert (core/experts.py),
    so :func:`find_targets` sees each expert's matrices; those holding none stay fused.

    Returns:
        The names of the experts modules split.
    """
    split = unfuse_experts_(model)
    if not split:
        return []
    targets = find_targets(model, include, exclude)
    kept = [name for name in split if any(t.startswith(name + ".") for t in targets)]
    fuse_experts_(model, set(split) - set(kept))
    return kept


def _select(model: nn.Module, include, exclude) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(targets, left-out reasons) under the patterns (see :func:`find_targets`)."""
    skip = left_out(model)
    include_res = [_compile(p, "--include") for p in include]
    exclude_res = [_compile(p, "--exclude") for p in exclude]
    factorable = {name: module for name, module in model.named_modules() if name and is_factorable(module)}
    opted = {n for n, (kind, _) in skip.items() if kind in OPT_IN and any(p.fullmatch(n) for p in include_res)}
    candidates = {n: m for n, m in factorable.items() if n not in skip or n in opted}
    named = [*candidates, *fused_expert_names(model)]  # a pattern may name experts kept fused
    for flag, patterns in (("--include", include_res), ("--exclude", exclude_res)):
        for pattern in patterns:
            if not any(pattern.search(name) for name in named):
                raise LoraCompressError(
                    f"{flag} {pattern.pattern!r} matches no linear module; run "
                    f"`lora-compress inspect MODEL` to list module names")
    reasons = {n: why for n, (_, why) in skip.items() if n not in opted}
    if include_res:
        reasons.update({n: "matches no --include pattern" for n in candidates
                        if not any(p.search(n) for p in include_res)})
        candidates = {n: m for n, m in candidates.items() if any(p.search(n) for p in include_res)}
    reasons.update({n: "matches --exclude" for n in candidates if any(p.search(n) for p in exclude_res)})
    targets = {n: m for n, m in candidates.items() if not any(p.search(n) for p in exclude_res)}
    if not targets:
        opt_in = [n for n, (kind, _) in skip.items() if kind in OPT_IN and n not in opted]
        hint = (f"; {opt_in[0]} is a {skip[opt_in[0]][0]}, left dense by default: --include '{re.escape(opt_in[0])}' "
                f"factors it" if opt_in else "")
        raise LoraCompressError(f"no linear module is left to compress; loosen --include/--exclude{hint}")
    return targets, {n: reasons[n] for n, _ in model.named_modules() if n in reasons}  # routers of any type too


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise LoraCompressError(f"{flag} {pattern!r} is not a valid regular expression ({error}); "
                                f"fix the pattern") from None
