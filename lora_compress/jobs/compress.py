"""``compress(MODEL, OUT, config)``: a checkpoint (folder, GGUF or Hub id) in, a self-contained folder out.

    in memory   load_dense → methods.compress_ → save_weights + finish_compressed (config, modeling file, manifest)
    --stream    plain SVD tensor by tensor (stream/tensorwise.py, also under torchrun), a calibrated
                method block by block (stream/blockwise.py)

The output is written into a temporary folder beside OUT and renamed at the end (storage/output.py).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from ..calibrate.tokens import calibration_tokens, read_calibration_text
from ..core.experts import experts_manifest
from ..core.pages import releasing_checkpoint_pages
from ..errors import LoraCompressError, LoraCompressWarning
from ..methods.compress import check_calibrated, compress_
from ..methods.config import CompressConfig
from ..methods.registry import get_method
from ..methods.results import CompressionReport
from ..report.folder import report_images, write_report
from ..storage.card import compressed_card, write_card
from ..storage.checkpoint import copy_side_files, load_dense, load_tokenizer, resolve_source
from ..storage.compressed import FORMAT_VERSION, finish_compressed, save_weights
from ..storage.output import atomic_folder, check_output_folder, holds_outputs
from ..stream.block_loader import BlockLoader
from ..stream.blockwise import compress_blockwise
from ..stream.distributed import join, launched, leave
from ..stream.lazy import open_lazily
from ..stream.tensorwise import compress_tensorwise
from ..version import versions
from . import memory

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
        "experts": experts_manifest(model),  # split experts modules: a loader splits these before the factors go in
        "calibration": report.calibration,
    }


@holds_outputs()
def compress(model: str, out: str | Path, config: CompressConfig, *, gguf_file: str | None = None,
             force: bool = False, command: str | None = None, progress: bool = True,
             stream: bool = False, dtype: str | None = None, memory_limit: int | str | None = None,
             adapters: bool = False) -> CompressionReport:
    """Compress a checkpoint (folder, GGUF or Hub id) into a self-contained folder ``out``.

    Before any compute the peak memory of the in-memory and the streamed path is estimated from
    the shapes and the calibration size (jobs/memory.py) and compared with the memory available,
    or ``memory_limit`` (bytes, or a size such as ``"20G"``): the in-memory path when it fits, else
    streamed (a warning says so), else a LoraCompressError naming the figures.

    ``stream`` reads and writes one tensor (plain SVD; implied under torchrun, see
    :mod:`lora_compress.stream.tensorwise`) or one transformer block (calibrated methods, see
    :mod:`lora_compress.stream.blockwise`) at a time; ``dtype`` (float32, float16, bfloat16)
    sets the dtype the output is stored in (the checkpoint's by default; the calibrated pass
    computes in float32 where the device has no fast kernels for a half-precision dtype);
    ``adapters`` also writes ``adapters.safetensors``, the factors alone.

    Example:
        >>> report = compress("models/minilm", "out/minilm-50", CompressConfig(ratio=0.5))
        >>> model = load("out/minilm-50")

    Raises:
        LoraCompressError: bad input of any kind, or not enough memory for any path; nothing is written then.
    """
    check_output_folder(Path(out), force, inputs=(model,))
    calib_text = read_calibration_text(config.calib) if config.calib and config.record.calibration else None
    if launched() and config.record.calibration:
        raise LoraCompressError(f"--method {config.method} streams block by block in one process; drop torchrun "
                                f"(torchrun splits plain SVD only)")
    check_calibrated(config, calib_text)
    source = resolve_source(model, gguf_file)
    streaming_asked = stream or launched()
    checkpoint = None if source.gguf_file and not streaming_asked else open_lazily(source, config, parse_dtype(dtype))
    if _streams(source, checkpoint, config, streaming_asked, memory_limit):
        if config.calib_generated:
            raise LoraCompressError("--calib-generated needs the whole model in memory to write text, and this run "
                                    "streams block by block; pass --calib FILE with --calib-generated 0")
        if config.record.calibration:
            return _compress_calibrated_streamed(source, checkpoint, out, config, calib_text, force=force,
                                                 command=command, progress=progress, adapters=adapters, model=model)
        return _compress_streamed(source, checkpoint, out, config, force=force, command=command, progress=progress,
                                  adapters=adapters, model=model)
    with atomic_folder(Path(out), force, inputs=(model,)) as tmp:
        dense = load_dense(source, parse_dtype(dtype) or "auto")
        tokenizer = load_tokenizer(source)
        tokens = calibration_batch(tokenizer, calib_text, config) if calib_text is not None else None
        with releasing_checkpoint_pages():  # loaded here from its files, never written to
            report = compress_(dense, config, progress=progress, tokens=tokens, spill_folder=tmp)
        manifest = build_manifest(source, dense, config, report, command)
        save_weights(tmp, dense)
        _write_companions(tmp, source, dense, tokenizer, manifest, out, adapters)
    return report


def _streams(source, checkpoint, config: CompressConfig, stream: bool, memory_limit: int | str | None) -> bool:
    """Whether this run streams: as asked where that fits, else whatever path fits (jobs/memory.py)."""
    limit = memory.parse_size(memory_limit) if isinstance(memory_limit, str) else memory_limit
    if checkpoint is None:  # a GGUF file: transformers dequantises it whole; there is no streamed path
        return False
    found = memory.estimate(checkpoint.model, config, checkpoint.targets, checkpoint.dtype)
    streamed = memory.choose_path(found, stream, limit)
    if streamed and not stream:
        budget = memory.gib(limit) if limit is not None else f"{memory.gib(memory.available_bytes())} available"
        warnings.warn(f"in memory this needs about {memory.gib(found.in_memory)} but {budget}: streaming block by "
                      f"block instead (about {memory.gib(found.streamed)}), as --stream does", LoraCompressWarning,
                      stacklevel=3)
    return streamed


def _write_companions(tmp: Path, source, model, tokenizer, manifest: dict, out, adapters: bool) -> None:
    """Config and modeling file, manifest, tokenizer, report and model card next to the weights."""
    copy_side_files(source, model, tokenizer, tmp)
    finish_compressed(tmp, model.config, manifest, adapters=adapters)
    write_report(tmp, manifest)
    write_card(tmp, compressed_card(manifest, report_method(manifest), images=report_images(tmp)),
               load_path=str(out))


def _compress_streamed(source, checkpoint, out, config: CompressConfig, *, force: bool, command, progress: bool,
                       adapters: bool, model: str) -> CompressionReport:
    """Plain SVD, one tensor in memory at a time; under torchrun the layers are split, rank 0 writes."""
    group, report = join(config.device), None
    try:
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


def _compress_calibrated_streamed(source, checkpoint, out, config: CompressConfig, calib_text: str, *, force: bool,
                                  command, progress: bool, adapters: bool, model: str) -> CompressionReport:
    """A calibrated method with one transformer block in memory at a time, in one process."""
    blocks = BlockLoader(checkpoint, config.device)
    tokenizer = load_tokenizer(source)
    tokens = calibration_batch(tokenizer, calib_text, config)
    with atomic_folder(Path(out), force, inputs=(model,)) as tmp:
        with releasing_checkpoint_pages():  # blocks read from the files here, never written to
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
