"""Where each model tensor lies in a checkpoint, as transformers 5 renames and fuses tensors on load.

A Mixtral checkpoint on the Hub (and what ``save_pretrained`` writes) keeps every expert apart:

    model.layers.0.block_sparse_moe.experts.3.w1.weight   (I, H)   gate of expert 3
    model.layers.0.block_sparse_moe.experts.3.w3.weight   (I, H)   up
    model.layers.0.block_sparse_moe.experts.3.w2.weight   (H, I)   down

while the model holds ``model.layers.0.mlp.experts.gate_up_proj`` (E, 2·I, H) and ``down_proj``
(E, H, I). transformers' conversion mapping says how: renamings, then converters that stack the
experts (MergeModulelist, dim 0) and join gate and up (Concatenate, dim 1). Streaming reads those
pieces itself, one expert (or one fused tensor) at a time; other converter operations are refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_SUPPORTED_OPERATIONS = ((("MergeModulelist", 0),), (("MergeModulelist", 0), ("Concatenate", 1)))


@dataclass(frozen=True)
class Assembled:
    """A model tensor made of checkpoint tensors: per expert, the rows of one or more checkpoint
    tensors (or slices of them) joined; stacked into (E, …) when the model holds them fused."""

    parts: tuple[tuple[tuple[str, int | None], ...], ...]  # per expert: ((checkpoint key, slice index or None), …)
    stacked: bool  # the whole fused tensor, else one expert's matrix
    transposed: bool = False  # each expert's joined matrix is transposed (experts stored (in, out))

    def expert(self, index: int, transposed: bool = False) -> "Assembled":
        """Expert ``index`` alone, as one matrix."""
        return Assembled((self.parts[index],), False, transposed)


@dataclass(frozen=True)
class CheckpointLayout:
    """Model tensor name → where it lies: a checkpoint name (``renamed``) or several tensors (``assembled``)."""

    renamed: dict[str, str]  # model key → checkpoint key (the same name unless transformers renames it)
    assembled: dict[str, Assembled]  # model key → the checkpoint tensors transformers fuses into it
    refused: dict[str, str]  # model key → why streaming cannot assemble it


def checkpoint_layout(model: nn.Module, checkpoint_keys) -> CheckpointLayout:
    """Map the checkpoint's tensor names onto ``model``'s, by transformers' own conversion mapping."""
    renamings, converters = _conversions(model)
    if not renamings and not converters:
        return CheckpointLayout({key: key for key in checkpoint_keys}, {}, {})
    from transformers.core_model_loading import rename_source_key

    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    renamed, pieces, refused = {}, {}, {}
    for key in checkpoint_keys:
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if pattern is None:
            renamed[target] = key
            continue
        converter, index = _expert_index(key, renamings, converters, pattern)
        operations = tuple((type(op).__name__, getattr(op, "dim", None)) for op in converter.operations)
        if operations not in _SUPPORTED_OPERATIONS or index is None:
            refused[target] = (f"transformers builds {target} from {pattern} tensors by "
                               f"{', '.join(op for op, _ in operations)}, which streaming does not read")
            continue
        entry = pieces.setdefault(target, (converter, {}))
        entry[1].setdefault(pattern, {})[index] = key
    assembled = {}
    for target, (converter, found) in pieces.items():
        experts = [sorted(indices) for indices in found.values()]
        if any(indices != list(range(len(experts[0]))) for indices in experts):
            refused[target] = f"the checkpoint lacks some experts' tensors of {target}"
            continue
        assembled[target] = _assembled(converter, found)
    return CheckpointLayout(renamed, assembled, refused)


def _conversions(model: nn.Module) -> tuple[list, list]:
    """(renamings, converters) transformers applies when loading ``model``; none before transformers 5."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def _expert_index(key: str, renamings, converters, pattern: str):
    """(the converter whose ``pattern`` matched ``key``, the expert index its ``*`` stands for)."""
    from transformers.core_model_loading import apply_renamings

    renamed = apply_renamings(key, renamings)
    converter = next(c for c in converters if pattern in c.source_patterns)
    found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
    return converter, int(found.group(1)) if found and found.groups() else None


def _assembled(converter, found: dict[str, dict[int, str]]) -> Assembled:
    """The fused tensor: expert e's matrix joins the rows of each source pattern's tensor e, in the
    converter's pattern order (Concatenate along dim 1 of the stack = along the rows of each expert)."""
    patterns = [p for p in converter.source_patterns if p in found]
    return Assembled(tuple(tuple((found[p][e], None) for p in patterns) for e in range(len(found[patterns[0]]))), True)
