"""PNG plots of spectra, ranks, energy, drift, healing and run comparisons (matplotlib, Agg).

matplotlib (a dependency) is imported only when a plot is drawn, and
only through ``matplotlib.figure.Figure`` (no pyplot), so no display or global backend is
involved. Every function takes plain data, a title and an output path, and returns the path.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..calibrate.blocks import split_name
from ..core.svd import break_even_rank
from ..errors import LoraCompressError
from .spectra import Spectrum, by_kind

DPI = 110
METRIC_LABELS = {"perplexity": "perplexity", "cosine_mean": "mean cosine similarity to dense embeddings"}


def available() -> bool:
    """True when matplotlib can be imported."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float):
    if not available():
        raise LoraCompressError("plots need matplotlib, which cannot be imported; reinstall it (pip install matplotlib)")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(figure, path: Path) -> Path:
    """The figure as a PNG at exactly ``path`` (matplotlib would add .png to a name without it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _grid(figure, count: int):
    columns = min(4, count)
    rows = math.ceil(count / columns)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis in axes[count:]:
        axis.set_visible(False)
    return axes[:count]


def _depth_colours(spectra: list[Spectrum]):
    """A colour per block index (dark = first block), and the colour bar's mappable."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    blocks = [s.block for s in spectra if s.block is not None] or [0]
    norm = Normalize(min(blocks), max(max(blocks), min(blocks) + 1))
    cmap = colormaps["viridis"]
    return (lambda block: cmap(norm(block if block is not None else min(blocks)))), ScalarMappable(norm, cmap)


def spectrum_plots(spectra: list[Spectrum], title: str, folder: Path, whitened: bool = False) -> list[Path]:
    """``spectrum[_whitened].png`` (σ_i/σ_1, log scale) and ``energy[_whitened].png`` (Σσ² kept vs rank).

    One panel per layer type, one line per layer coloured by depth, break-even rank dashed.
    """
    groups = by_kind(spectra)
    colour, mappable = _depth_colours(spectra)
    suffix, what = ("_whitened", "σ of W·L (whitened by calibration inputs)") if whitened else ("", "σ of W")
    paths = []
    for name, ylabel in (("spectrum", "σᵢ / σ₁ (log scale)"), ("energy", "energy kept  Σᵢ≤ᵣ σᵢ² / Σ σᵢ²")):
        figure = _figure(4 * min(4, len(groups)) + 1, 3.2 * math.ceil(len(groups) / 4) + 0.8)
        for axis, (kind, group) in zip(_grid(figure, len(groups)), groups.items()):
            for spectrum in group:
                sv = spectrum.singular_values
                y = (sv / sv[0]) if name == "spectrum" else spectrum.energy()
                axis.plot(range(1, len(sv) + 1), y.float().numpy(), color=colour(spectrum.block), lw=0.9)
            axis.axvline(break_even_rank(*group[0].shape), color="red", ls="--", lw=1, label="break-even rank")
            if name == "spectrum":
                axis.set_yscale("log")
            else:
                axis.set_ylim(0, 1.01)
            axis.set(title=f"{kind}  ({group[0].shape[0]}×{group[0].shape[1]}, {len(group)} layers)",
                     xlabel="rank r (index i)", ylabel=ylabel)
            axis.grid(alpha=0.3)
        figure.axes[0].legend(loc="lower left" if name == "spectrum" else "lower right", fontsize=8)
        figure.colorbar(mappable, ax=figure.axes, label="block (depth)", shrink=0.8)
        figure.suptitle(f"{title}: {what}", fontsize=12)
        paths.append(_save(figure, Path(folder) / f"{name}{suffix}.png"))
    return paths


def _layer_grid(layers: dict) -> tuple[list, list, dict]:
    """Rows (blocks, then layers outside blocks), columns (layer types) and name per cell."""
    cells = {}
    for name in layers:
        block, kind = split_name(name)
        row = block if block is not None else "outside blocks"
        cells[(row, kind)] = name
    rows = list(dict.fromkeys(row for row, _ in cells))
    columns = list(dict.fromkeys(kind for _, kind in cells))
    return rows, columns, cells


def rank_heatmap(layers: dict, title: str, path: Path) -> Path:
    """Blocks × layer types; the cell shows the rank, its colour the fraction of parameters kept.

    ``layers`` is the manifest's per-layer dict (``shape``, ``rank``; rank None = left dense).
    """
    import numpy as np
    from matplotlib.colors import ListedColormap

    rows, columns, cells = _layer_grid(layers)
    kept = np.full((len(rows), len(columns)), np.nan)  # NaN: no such layer, or left dense
    dense = np.full_like(kept, np.nan)  # 1 where a layer was left dense
    figure = _figure(2.6 + 1.25 * len(columns), 1.6 + 0.3 * len(rows))
    axis = figure.subplots()
    for (row, kind), name in cells.items():
        i, j, layer = rows.index(row), columns.index(kind), layers[name]
        (out_features, in_features), rank = layer["shape"], layer["rank"]
        if rank is None:
            dense[i, j] = 1.0
            axis.text(j, i, "dense", ha="center", va="center", fontsize=7, color="dimgray")
            continue
        kept[i, j] = rank * (out_features + in_features) / (out_features * in_features)
        axis.text(j, i, rank, ha="center", va="center", fontsize=8, color="black" if kept[i, j] > 0.6 else "white")
    axis.imshow(dense, cmap=ListedColormap(["gainsboro"]), aspect="auto")
    image = axis.imshow(kept, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), [str(r) for r in rows])
    axis.set(xlabel="layer type", ylabel="block",
             title=f"{title}\nrank per layer (number), parameters kept (colour), grey = left dense")
    figure.colorbar(image, ax=axis, label="weight parameters kept (fraction)")
    return _save(figure, path)


def energy_per_layer(layers: dict, title: str, path: Path) -> Path:
    """Energy kept by each factored layer against its block, one line per layer type."""
    rows, columns, cells = _layer_grid(layers)
    figure = _figure(9, 4.5)
    axis = figure.subplots()
    blocks = [row for row in rows if isinstance(row, int)]
    for kind in columns:
        energy = [layers[cells[(b, kind)]]["energy_kept"] if (b, kind) in cells else None for b in blocks]
        if any(e is not None for e in energy):  # None → NaN: a gap in the line where a layer stayed dense
            axis.plot(blocks, [math.nan if e is None else e for e in energy], marker="o", ms=3, lw=1, label=kind)
    axis.set(xlabel="block", ylabel="energy kept  Σᵢ≤ᵣ σᵢ² / Σ σᵢ²",
             title=f"{title}\nenergy kept per factored layer (dense layers not shown)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    return _save(figure, path)


def drift_per_block(drift: dict, title: str, path: Path) -> Path:
    """Relative error of each block's output: cumulative (end to end) and local (block alone)."""
    blocks, local = range(len(drift["cumulative"])), drift["local"]
    values = [v for v in drift["cumulative"] + local if v > 0]
    log = bool(values) and max(values) / min(values) > 30
    unchanged = log and 0.0 in local  # log scale: blocks that add no error are left out, not drawn at -inf
    figure = _figure(9, 4.5)
    axis = figure.subplots()
    axis.plot(blocks, drift["cumulative"], marker="o", ms=3, label="cumulative: compressed model end to end")
    axis.plot(blocks, [v if v > 0 or not log else math.nan for v in local], marker="s", ms=4,
              label="local: this block alone, fed the dense input" + (" (0 where unchanged: not drawn)"
                                                                        if unchanged else ""))
    worst = max(blocks, key=lambda i: local[i])
    left = worst > len(blocks) / 2  # keep the label inside the axes
    axis.annotate(f"largest local error: block {worst}", (worst, local[worst]), xytext=(-10 if left else 10, 14),
                  textcoords="offset points", ha="right" if left else "left", arrowprops={"arrowstyle": "->"}, fontsize=8)
    if log:
        axis.set_yscale("log")
    axis.set(xlabel=f"block ({drift['stack']}.i)", ylabel="relative error  ‖h_c − h_d‖ / ‖h_d‖",
             title=f"{title}\noutput drift per block ({drift['tokens']:,} tokens)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


def healing_loss(healing: dict, title: str, path: Path) -> Path:
    """Training loss per step, with the held-out loss before and after healing."""
    history = healing["history"]
    figure = _figure(9, 4.5)
    axis = figure.subplots()
    axis.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="training loss")
    for key, style in (("held_out_before", ":"), ("held_out_after", "--")):
        value = healing.get(key)
        if value is not None and math.isfinite(value):
            axis.axhline(value, color="black", ls=style, lw=1, label=f"{key.replace('_', ' ')}: {value:.4g}")
    axis.set(xlabel="step", ylabel=f"distillation loss ({healing.get('settings', {}).get('loss', 'loss')})",
             title=f"{title}\nhealing loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _save(figure, path)


def quality_vs_params(runs: list[dict], metric: str, title: str, path: Path) -> Path:
    """One point per run: whole-model parameters against a quality figure (e.g. perplexity).

    ``runs`` items carry ``label``, ``params`` (compressed total), ``value`` and ``dense``
    (the dense model's figure, drawn as a line; None for metrics without one).
    """
    figure = _figure(8, 5)
    axis = figure.subplots()
    runs = sorted(runs, key=lambda r: r["params"])
    axis.plot([r["params"] / 1e6 for r in runs], [r["value"] for r in runs], marker="o")
    for run in runs:
        axis.annotate(run["label"], (run["params"] / 1e6, run["value"]), xytext=(5, 5),
                      textcoords="offset points", fontsize=8)
    dense = next((r["dense"] for r in runs if r.get("dense") is not None), None)
    if dense is not None:
        axis.axhline(dense, color="black", ls="--", lw=1, label=f"dense: {dense:.4g}")
        axis.legend(fontsize=8)
    values = [r["value"] for r in runs] + ([dense] if dense is not None else [])
    log = metric == "perplexity" and max(values) / min(values) > 3  # blown-up runs would flatten the rest
    if log:
        axis.set_yscale("log")
    axis.margins(x=0.2)  # room for the run labels
    axis.set(xlabel="parameters, whole model (millions)", title=title,
             ylabel=METRIC_LABELS.get(metric, metric) + (" (log scale)" if log else ""))
    axis.grid(alpha=0.3)
    return _save(figure, path)
