"""Singular-value spectra of a model's targeted layers: where the energy sits, per layer type.

    spectrum of W           plain: what truncated SVD keeps
    spectrum of W·L         whitened (L Lᵀ = XᵀX of calibration inputs, shrunk as the default method
                            shrinks it): what the calibrated methods keep, the one whitened spectrum of
                            methods/ranks.layer_whitening that the budget and the energy rule read too

A layer's name splits into its block index and its type (calibrate/blocks.py: ``model.layers.3.self_attn.q_proj``
→ ``(3, "self_attn.q_proj")``), so layers of one type can be read side by side across depth.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..calibrate.blocks import split_name
from ..core.experts import fused_name
from ..core.layers import dense_weight
from ..core.svd import break_even_rank, rank_for_energy
from ..methods.ranks import layer_whitening
from .tables import render

ENERGY_LEVELS = (0.9, 0.95, 0.99)  # columns of the spectrum table


@dataclass(frozen=True)
class Spectrum:
    """All singular values of one layer's weight (or of W·L when whitened)."""

    name: str
    shape: tuple[int, int]  # (out, in)
    singular_values: torch.Tensor  # (min(out, in),) descending, float64

    @property
    def kind(self) -> str:
        """The layer type; a layer's experts are one type (``mlp.experts.gate_up_proj``)."""
        return fused_name(split_name(self.name)[1])

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
def layer_spectra(targets: dict, stats: dict | None = None, shrinkage: float = 0.0,
                  progress: bool = True) -> list[Spectrum]:
    """Spectra of the targeted layers, plain, or whitened on ``stats`` (each layer's calibration statistics:
    methods/ranks.RULE_STATISTICS) with the input Gram shrunk by ``shrinkage``.

    Args:
        targets: module name → module (from :func:`lora_compress.core.targets.find_targets`).
        stats: optional name → LayerStatistics of the layer's calibration inputs.
        shrinkage: how far the whitening shrinks the input Gram towards its diagonal.
        progress: show a progress bar over layers.
    """
    spectra = []
    desc = "whitened spectra" if stats is not None else "spectra"
    for name, module in tqdm(targets.items(), desc=desc, unit="layer", disable=not progress):
        weight = dense_weight(module)  # (out, in)
        if stats is None:
            singular = torch.linalg.svdvals(weight.float()).double()
        else:
            singular = layer_whitening(weight, stats[name], shrinkage, fisher=False).spectrum().sqrt()
        spectra.append(Spectrum(name, tuple(weight.shape), singular))
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


