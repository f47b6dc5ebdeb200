"""What ``lora-compress inspect`` shows: the targeted layers of a checkpoint, or their spectra."""
from __future__ import annotations

import os
from pathlib import Path

from ..calibrate.collectors import forward_statistics
from ..calibrate.tokens import calibration_tokens, read_calibration_text
from ..core.counting import total_params
from ..core.experts import experts_by_matrix, unfuse_experts_
from ..core.layers import dense_weight
from ..core.left_out import unsupported_experts
from ..core.svd import break_even_rank
from ..core.targets import find_targets, left_out_reasons
from ..methods.config import CALIBRATED_DEFAULT
from ..methods.ranks import RULE_STATISTICS
from ..methods.registry import get_method
from ..errors import LoraCompressError
from ..storage.checkpoint import load_dense, load_tokenizer, resolve_source
from .plots import spectrum_plots
from .spectra import layer_spectra, spectrum_table
from .tables import render


def inspect_model(model: str, gguf_file: str | None = None, include=(), exclude=()) -> str:
    """Two tables: the targeted layers (shape, parameters, break-even rank; a layer's experts on one
    row, E × out×in), and the layers left dense with the reason; then the totals."""
    source = resolve_source(model, gguf_file)
    dense = load_dense(source)
    total = total_params(dense)
    unfuse_experts_(dense)  # every expert's matrices listed, targeted or not
    targets = find_targets(dense, include, exclude)
    rows = [[name, kind, shape, f"{params:,}", break_even_rank(*dense_weight(module).shape)]
            for name, kind, shape, params, module in _grouped(dense, targets, lambda n: "")]
    targeted = sum(dense_weight(m).numel() for m in targets.values())
    left = left_out_reasons(dense, include, exclude)
    kept = [[name, kind, shape, why] for name, kind, shape, _, why in
            _grouped(dense, {n: dense.get_submodule(n) for n in left}, left.get)]
    kept += [[name, "experts", "-", why] for name, why in unsupported_experts(dense).items()]
    tables = render(rows, ["layer", "type", "out×in", "params", "break-even rank"])
    if kept:
        tables += "\n\nleft dense:\n" + render(kept, ["layer", "type", "out×in", "why"])
    return (f"{tables}\n\n{type(dense).__name__}: {total:,} parameters (tied embeddings once); "
            f"{len(rows)} targeted rows ({len(targets)} matrices) hold {targeted:,} ({targeted / total:.1%})")


def _grouped(model, modules: dict, why):
    """``(name, type, shape, params, module or why)`` rows: one per module, or one per fused expert
    tensor for the experts among ``modules`` (``E × out×in``, E the experts listed)."""
    experts = experts_by_matrix(model, modules)
    grouped = {name for names in experts.values() for name in names}
    for name, module in modules.items():
        out_features, in_features = dense_weight(module).shape
        if name not in grouped:
            yield name, type(module).__name__, f"{out_features}×{in_features}", out_features * in_features, \
                why(name) or module
            continue
        fused, _, index = name.rpartition(".")
        if experts[fused][0] == name:
            count = len(experts[fused])
            yield fused, "experts", f"{count} × {out_features}×{in_features}", count * out_features * in_features, \
                why(name) or module


def _check_plot_folder(folder: Path) -> None:
    """Before any compute: --plot names a folder (made if missing), not a file nor a place under one."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir():
        raise LoraCompressError(f"--plot {folder}: {existing} is a file, and --plot names a folder to write the "
                                f"spectrum PNGs into; choose a folder")


def calibration_statistics(model, tokenizer, targets: dict, calib: str, samples: int, length: int,
                           progress: bool = True) -> dict:
    """Each target's calibration statistics for its whitened spectrum, from calibration text."""
    tokens = calibration_tokens(tokenizer, read_calibration_text(calib), samples, length)  # (samples, length)
    return forward_statistics(model, tokens, targets, RULE_STATISTICS, progress)


def inspect_spectra(model: str, gguf_file: str | None = None, include=(), exclude=(), plot=None,
                    calib: str | None = None, calib_samples: int = 32, calib_len: int = 256,
                    progress: bool = True) -> str:
    """What ``lora-compress inspect --spectrum`` prints; with ``plot``, PNGs into that folder.

    Plain spectra always; whitened ones too when ``calib`` names calibration text
    (``calib_samples`` sequences of ``calib_len`` tokens, as ``compress --calib`` uses).

    Raises:
        LoraCompressError: bad model, patterns or calibration text; ``plot`` is a file or lies under one;
            matplotlib missing for ``plot``.
    """
    if plot:
        _check_plot_folder(Path(plot))
    source = resolve_source(model, gguf_file)
    dense = load_dense(source)
    unfuse_experts_(dense)  # each expert's matrices have spectra of their own
    targets = find_targets(dense, include, exclude)
    name = f"{Path(os.path.normpath(source.name)).name} ({len(targets)} layers)"
    stats = calibration_statistics(dense, load_tokenizer(source), targets, calib, calib_samples, calib_len,
                                   progress) if calib else None  # first: a bad --calib fails before the slow part
    results = {"plain": layer_spectra(targets, progress=progress)}
    shrinkage = get_method(CALIBRATED_DEFAULT).config_class().input_shrinkage
    if stats is not None:
        results["whitened"] = layer_spectra(targets, stats, shrinkage, progress)
    lines = []
    for kind, spectra in results.items():
        what = "σ of W" if kind == "plain" else (f"σ of W·L, L Lᵀ = (1 − {shrinkage:g})·XᵀX + {shrinkage:g}·diag(XᵀX) "
                                                 f"of inputs from {calib}, as {CALIBRATED_DEFAULT} whitens")
        lines += [f"{kind} spectra ({what}):", spectrum_table(spectra), ""]
        if plot:
            paths = spectrum_plots(spectra, name, Path(plot), whitened=kind == "whitened")
            lines += [f"wrote {path}" for path in paths] + [""]
    return "\n".join(lines).rstrip()
