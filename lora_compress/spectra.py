"""Singular-value spectra of a model's targeted layers: where the energy sits, per layer type.

    spectrum of W           plain: what truncated SVD keeps
    spectrum of W·L         whitened (L Lᵀ = XᵀX of calibration inputs): what SVD-LLM keeps

A layer's name splits into its block index and its type, e.g. ``model.layers.3.self_attn.q_proj``
→ ``(3, "self_attn.q_proj")``, so layers of one type can be read side by side across depth.
"""
from __future__ import annotations

import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .layers import dense_weight
from .svd import break_even_rank, cholesky_factor, rank_for_energy
from .tables import render

ENERGY_LEVELS = (0.9, 0.95, 0.99)  # columns of the spectrum table
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def split_name(name: str) -> tuple[int | None, str]:
    """``(block index, layer type)`` of a module name; ``(None, name)`` outside the blocks."""
    match = _BLOCK_INDEX.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


@dataclass(frozen=True)
class Spectrum:
    """All singular values of one layer's weight (or of W·L when whitened)."""

    name: str
    shape: tuple[int, int]  # (out, in)
    singular_values: torch.Tensor  # (min(out, in),) descending, float64

    @property
    def kind(self) -> str:
        return split_name(self.name)[1]

    @property
    def block(self) -> int | None:
        return split_name(self.name)[0]

    def energy(self) -> torch.Tensor:
        """Cumulative fraction of Σσ² kept by ranks 1..k, (k,)."""
        power = self.singular_values.pow(2)
        return torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)

    def rank_for(self, energy: float) -> int:
        return rank_for_energy(self.singular_values, energy)


@torch.no_grad()
def layer_spectra(targets: dict, grams=None, progress: bool = True) -> list[Spectrum]:
    """Spectra of the targeted layers, plain, or whitened when ``grams(name)`` gives XᵀX.

    Args:
        targets: module name → module (from :func:`lora_compress.targets.find_targets`).
        grams: optional callable name → (in, in) Gram of the layer's calibration inputs.
        progress: show a progress bar over layers.
    """
    spectra = []
    desc = "whitened spectra" if grams is not None else "spectra"
    for name, module in tqdm(targets.items(), desc=desc, unit="layer", disable=not progress):
        weight = dense_weight(module).float()  # (out, in)
        if grams is not None:  # whitening squares the condition number: float64 there
            weight = weight.double() @ cholesky_factor(grams(name))[0]  # (out, in)
        spectra.append(Spectrum(name, tuple(weight.shape), torch.linalg.svdvals(weight).double()))
    return spectra


def by_kind(spectra: list[Spectrum]) -> dict[str, list[Spectrum]]:
    """Spectra grouped by layer type, in first-seen order."""
    groups: dict[str, list[Spectrum]] = {}
    for spectrum in spectra:
        groups.setdefault(spectrum.kind, []).append(spectrum)
    return groups


def spectrum_table(spectra: list[Spectrum]) -> str:
    """Per layer type: shape, break-even rank, and the rank that keeps 90/95/99% of the energy.

    Ranks are the median over the layers of a type, with the range across depth in brackets.
    """
    rows = []
    for kind, group in by_kind(spectra).items():
        out_features, in_features = group[0].shape
        row = [kind, len(group), f"{out_features}×{in_features}", break_even_rank(out_features, in_features)]
        for level in ENERGY_LEVELS:
            ranks = [s.rank_for(level) for s in group]
            row.append(f"{int(statistics.median(ranks))} [{min(ranks)}–{max(ranks)}]")
        rows.append(row)
    header = ["layer type", "layers", "out×in", "break-even rank"] + [f"rank @{level:.0%} energy"
                                                                     for level in ENERGY_LEVELS]
    return render(rows, header)


def calibration_grams(model, tokenizer, targets: dict, calib: str, samples: int, length: int, progress: bool = True):
    """A ``grams(name)`` callable from calibration text, for whitened spectra."""
    from .calibrate import calibration_tokens, collect_statistics, read_calibration_text

    tokens = calibration_tokens(tokenizer, read_calibration_text(calib), samples, length)  # (samples, length)
    stats = collect_statistics(model, tokens, targets, fisher=False, progress=progress)
    return stats.gram


def inspect_spectra(model: str, gguf_file: str | None = None, include=(), exclude=(), plot=None,
                    calib: str | None = None, calib_samples: int = 32, calib_len: int = 256,
                    progress: bool = True) -> str:
    """What ``lora-compress inspect --spectrum`` prints; with ``plot``, PNGs into that folder.

    Plain spectra always; whitened ones too when ``calib`` names calibration text
    (``calib_samples`` sequences of ``calib_len`` tokens, as ``compress --calib`` uses).

    Raises:
        LoraCompressError: bad model, patterns or calibration text; matplotlib missing for ``plot``.
    """
    from .checkpoint import load_dense, load_tokenizer, resolve_source
    from .targets import find_targets

    source = resolve_source(model, gguf_file)
    dense = load_dense(source)
    targets = find_targets(dense, include, exclude)
    name = f"{Path(os.path.normpath(source.name)).name} ({len(targets)} layers)"
    grams = calibration_grams(dense, load_tokenizer(source), targets, calib, calib_samples, calib_len,
                              progress) if calib else None  # first: a bad --calib fails before the slow part
    results = {"plain": layer_spectra(targets, progress=progress)}
    if grams is not None:
        results["whitened"] = layer_spectra(targets, grams, progress)
    lines = []
    for kind, spectra in results.items():
        what = "σ of W" if kind == "plain" else f"σ of W·L, L Lᵀ = XᵀX of inputs from {calib}"
        lines += [f"{kind} spectra ({what}):", spectrum_table(spectra), ""]
        if plot:
            from .plots import spectrum_plots

            paths = spectrum_plots(spectra, name, Path(plot), whitened=kind == "whitened")
            lines += [f"wrote {path}" for path in paths] + [""]
    return "\n".join(lines).rstrip()
