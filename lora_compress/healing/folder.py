"""``heal(FOLDER, CALIB, OUT)``: a compressed folder healed against its dense base, written as a new folder."""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..calibrate.tokens import read_calibration_text
from ..errors import LoraCompressError, LoraCompressWarning, OptionError
from ..storage.checkpoint import Source, copy_side_files, load_dense, load_tokenizer, resolve_source
from ..storage.compressed import factored_modules, load, read_manifest, write_compressed
from ..storage.manifest import LayerEntry, Manifest
from ..storage.output import atomic_folder, check_output_folder, holds_outputs
from .config import HealConfig, HealReport
from .loop import heal_


@holds_outputs()
def heal(folder: str | Path, calib: str | Path, out: str | Path, config: HealConfig, *,
         base: str | None = None, gguf_file: str | None = None, force: bool = False, command: str | None = None,
         progress: bool = True, teacher: str | None = None) -> HealReport:
    """Heal a compressed folder against its dense base model (the teacher) and write the result to ``out``.

    The teacher is the manifest's ``base_model`` unless ``base`` names another checkpoint (``gguf_file``:
    a GGUF file inside it). ``calib`` is a text file or a ``datasets`` name. ``out`` has the same
    format as ``folder``; its manifest gains a ``healing`` entry. ``teacher`` is the deprecated
    spelling of ``base``.

    Example:
        >>> report = heal("out/smol-80", "asyoulik.txt", "out/smol-80-healed", HealConfig(minutes=15))
        >>> report.held_out_before, report.held_out_after

    Raises:
        LoraCompressError: not a compressed folder, text too short, base missing or different,
            ``out`` exists (without ``force``). Nothing is written then.
    """
    if teacher is not None:
        warnings.warn("teacher (--teacher) is deprecated; use base (--base)", LoraCompressWarning, stacklevel=2)
        base = base or teacher
    folder, out = Path(folder), Path(out)
    manifest = read_manifest(folder)
    if any(layer.shared for layer in manifest.layers.values()):
        raise LoraCompressError(f"{folder} shares one basis across experts (method {manifest.method}), which heal "
                                f"does not train: it trains each layer's own factors; heal a folder of another method")
    check_output_folder(out, force, inputs=(folder, base))
    text = read_calibration_text(str(calib))
    source = Source(folder.resolve(), str(folder))
    tokenizer = load_tokenizer(source)
    if tokenizer is None:
        raise LoraCompressError(f"{folder} has no tokenizer; copy the base model's tokenizer files into it")
    model, dense = load(folder), _load_base(base, gguf_file, manifest)
    report = heal_(model, dense, tokenizer, text, config, progress=progress)
    del dense
    healing = report.manifest(calib=str(calib), teacher=base or manifest.base_model, command=command)
    if manifest.healing is not None:
        healing["previous"] = manifest.healing
    manifest = manifest.replace(healing=healing, layers=_layers_with_ranks(manifest.layers, model))
    with atomic_folder(out, force, inputs=(folder, base)) as tmp:
        copy_side_files(source, model, tokenizer, tmp)
        write_compressed(tmp, model, manifest)
    return report


def _load_base(base: str | None, gguf_file: str | None, manifest: Manifest) -> nn.Module:
    """``base``, else the checkpoint the folder was compressed from: the folder it was read from
    while that still exists (the recorded name may be a path relative to another directory)."""
    folder = manifest.base_model_folder
    name = base or (folder if folder and Path(folder).is_dir() else manifest.base_model)
    try:
        return load_dense(resolve_source(name, gguf_file if base else manifest.gguf_file))
    except LoraCompressError as error:
        raise OptionError(f"base model {name}: {error} (or pass {{base}} with the dense model)") from None


def _layers_with_ranks(layers: dict[str, LayerEntry], model: nn.Module) -> dict[str, LayerEntry]:
    """The manifest's layer table with each factored layer's current rank (grown by train=lora)."""
    modules = factored_modules(model)
    return {name: replace(layer, rank=modules[name].rank) if name in modules else layer
            for name, layer in layers.items()}
