"""``compress(MODEL, OUT, config)``: a checkpoint (folder, GGUF or Hub id) in, a self-contained folder out.

    in memory   load_dense → methods.compress_ → save_weights + finish_compressed (config, modeling file, manifest)
    --stream    plain SVD tensor by tensor (stream/tensorwise.py, also under torchrun), a calibrated
                method block by block (stream/blockwise.py)

The output is written into a temporary folder beside OUT and renamed at the end (storage/output.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..calibrate.tokens import calibration_tokens, read_calibration_text
from ..errors import LoraCompressError
from ..methods.compress import check_calibrated, compress_
from ..methods.config import CompressConfig
from ..methods.registry import get_method
from ..methods.results import CompressionReport
from ..report.folder import report_images, write_report
from ..storage.card import compressed_card, write_card
from ..storage.checkpoint import copy_side_files, load_dense, load_tokenizer, resolve_source
from ..storage.compressed import FORMAT_VERSION, finish_compressed, save_weights
from ..storage.output import atomic_folder, check_output_folder
from ..stream.block_loader import BlockLoader
from ..stream.blockwise import compress_blockwise
from ..stream.distributed import join, launched, leave
from ..stream.lazy import open_lazily
from ..stream.tensorwise import compress_tensorwise
from ..version import versions

DTYPES = ("float32", "float16", "bfloat16")


def build_manifest(source, model, config: CompressConfig, report: CompressionReport, command=None) -> dict:
    """The ``lora_compress.json`` content for a compressed model."""
    return {
        "format_version": FORMAT_VERSION,
        "base_model": source.name,
        "base_model_folder": str(source.folder.resolve()),  # where it was read: the name may be relative
        "gguf_file": source.gguf_file,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "method": config.method,
        "settings": config.settings(),
        "command": command or " ".join(sys.argv),
        "versions": versions(),
        "targeted_params": {"dense": report.dense_params, "compressed": report.params},
        "layers": report.manifest_layers(),
        "calibration": report.calibration,
    }


def compress(model: str, out: str | Path, config: CompressConfig, *, gguf_file: str | None = None,
             force: bool = False, command: str | None = None, progress: bool = True,
             stream: bool = False, dtype: str | None = None, adapters: bool = False) -> CompressionReport:
    """Compress a checkpoint (folder, GGUF or Hub id) into a self-contained folder ``out``.

    ``stream`` reads and writes one tensor (plain SVD; implied under torchrun, see
    :mod:`lora_compress.stream.tensorwise`) or one transformer block (calibrated methods, see
    :mod:`lora_compress.stream.blockwise`) at a time; ``dtype`` (float32, float16, bfloat16)
    casts the model first; ``adapters`` also writes ``adapters.safetensors``, the factors alone.

    Example:
        >>> report = compress("models/minilm", "out/minilm-50", CompressConfig(ratio=0.5))
        >>> model = load("out/minilm-50")

    Raises:
        LoraCompressError: bad input of any kind; nothing is written then.
    """
    check_output_folder(Path(out), force, inputs=(model,))
    calib_text = read_calibration_text(config.calib) if config.calib and config.record.calibration else None
    if stream or launched():
        if config.record.calibration:
            return _compress_calibrated_streamed(model, out, config, calib_text, gguf_file=gguf_file, force=force,
                                                 command=command, progress=progress, dtype=dtype, adapters=adapters)
        return _compress_streamed(model, out, config, gguf_file=gguf_file, force=force, command=command,
                                  progress=progress, dtype=dtype, adapters=adapters)
    source = resolve_source(model, gguf_file)
    dense = load_dense(source, parse_dtype(dtype) or "auto")
    tokenizer = load_tokenizer(source)
    tokens = calibration_batch(tokenizer, calib_text, config) if calib_text is not None else None
    report = compress_(dense, config, progress=progress, tokens=tokens)
    manifest = build_manifest(source, dense, config, report, command)
    with atomic_folder(Path(out), force, inputs=(model,)) as tmp:
        save_weights(tmp, dense)
        _write_companions(tmp, source, dense, tokenizer, manifest, out, adapters)
    return report


def _write_companions(tmp: Path, source, model, tokenizer, manifest: dict, out, adapters: bool) -> None:
    """Config and modeling file, manifest, tokenizer, report and model card next to the weights."""
    copy_side_files(source, model, tokenizer, tmp)
    finish_compressed(tmp, model.config, manifest, adapters=adapters)
    write_report(tmp, manifest)
    write_card(tmp, compressed_card(manifest, report_method(manifest), images=report_images(tmp)),
               load_path=str(out))


def _compress_streamed(model: str, out, config: CompressConfig, *, gguf_file: str | None, force: bool, command,
                       progress: bool, dtype: str | None, adapters: bool) -> CompressionReport:
    """Plain SVD, one tensor in memory at a time; under torchrun the layers are split, rank 0 writes."""
    group, report = join(config.device), None
    try:
        source = resolve_source(model, gguf_file)
        checkpoint = open_lazily(source, config, parse_dtype(dtype))
        if not group.is_writer:
            report = compress_tensorwise(checkpoint, config, None, group, progress)
            return report
        with atomic_folder(Path(out), force, inputs=(model,)) as tmp:
            report = compress_tensorwise(checkpoint, config, tmp, group, progress)
            _write_streamed_companions(tmp, source, checkpoint, report, command, load_tokenizer(source), out,
                                       adapters)
        return report
    finally:
        leave(group, finished=report is not None)


def _compress_calibrated_streamed(model: str, out, config: CompressConfig, calib_text: str | None, *,
                                  gguf_file: str | None, force: bool, command, progress: bool,
                                  dtype: str | None, adapters: bool) -> CompressionReport:
    """A calibrated method with one transformer block in memory at a time, in one process."""
    if launched():
        raise LoraCompressError(f"--method {config.method} streams block by block in one process; drop torchrun "
                                f"(torchrun splits plain SVD only)")
    check_calibrated(config, calib_text)
    source = resolve_source(model, gguf_file)
    checkpoint = open_lazily(source, config, parse_dtype(dtype))
    blocks = BlockLoader(checkpoint)
    tokenizer = load_tokenizer(source)
    tokens = calibration_batch(tokenizer, calib_text, config)
    with atomic_folder(Path(out), force, inputs=(model,)) as tmp:
        report = compress_blockwise(blocks, config, tokens, tmp, progress)
        _write_streamed_companions(tmp, source, checkpoint, report, command, tokenizer, out, adapters)
    return report


def _write_streamed_companions(tmp: Path, source, checkpoint, report: CompressionReport, command, tokenizer,
                               out, adapters: bool) -> None:
    """Manifest, config, tokenizer, card and report next to streamed weights."""
    manifest = build_manifest(source, checkpoint.model, report.config, report, command)
    _write_companions(tmp, source, checkpoint.model, tokenizer, manifest, out, adapters)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``float32`` / ``float16`` / ``bfloat16`` as a torch dtype (None stays None: the checkpoint's own)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise LoraCompressError(f"--dtype {name!r} is unknown; choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def calibration_batch(tokenizer, text: str, config: CompressConfig) -> torch.Tensor:
    """The config's calibration sequences, (calib_samples, calib_len) token ids."""
    if tokenizer is None:
        raise LoraCompressError("the model folder has no tokenizer to cut --calib text into tokens; "
                                "copy its tokenizer files next to config.json")
    return calibration_tokens(tokenizer, text, config.calib_samples, config.calib_len)




def report_method(manifest: dict) -> str:
    """The one-line description of the manifest's method, from the registry."""
    return get_method(manifest["method"]).summary
