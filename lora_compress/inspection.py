"""What `lora-compress inspect` shows: the targeted layers of a checkpoint."""
from __future__ import annotations

from .checkpoint import load_dense, resolve_source
from .counting import total_params
from .layers import dense_weight
from .svd import break_even_rank
from .tables import render
from .targets import find_targets


def inspect_model(model: str, gguf_file: str | None = None, include=(), exclude=()) -> str:
    """A table of targeted layers (shape, parameters, break-even rank) and totals."""
    source = resolve_source(model, gguf_file)
    dense = load_dense(source)
    targets = find_targets(dense, include, exclude)
    rows = []
    for name, module in targets.items():
        out_features, in_features = dense_weight(module).shape
        rows.append([name, type(module).__name__, f"{out_features}×{in_features}",
                     f"{out_features * in_features:,}", break_even_rank(out_features, in_features)])
    targeted = sum(int(r[3].replace(",", "")) for r in rows)
    total = total_params(dense)
    return (f"{render(rows, ['layer', 'type', 'out×in', 'params', 'break-even rank'])}\n\n"
            f"{type(dense).__name__}: {total:,} parameters (tied embeddings once); "
            f"{len(rows)} targeted layers hold {targeted:,} ({targeted / total:.1%})")
