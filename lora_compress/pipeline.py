"""Checkpoint in, compressed folder out; and the evaluation of such a folder.

These are the library verbs behind the CLI: ``compress(MODEL, OUT, config)`` and
``evaluate_folder(MODEL, DIR, text)``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .checkpoint import (atomic_folder, copy_side_files, load, load_dense, load_tokenizer, model_class,
                         read_manifest, resolve_source, write_compressed, write_manifest, FORMAT_VERSION,
                         check_output_folder)
from .card import compressed_card, write_card
from .calibrate import calibration_tokens, read_calibration_text
from .blockwise import Blocks
from .compress import CompressConfig, CompressionReport, check_calibrated, compress_
from .counting import weight_bytes
from .errors import LoraCompressError
from .drift import DRIFT_TOKENS, block_drift, drift_batches
from .distributed import join, launched, leave
from .evaluate import EvalConfig, evaluate, fit_context
from . import streaming
from .stream_calibrated import compress_blockwise
from .report import write_report
from .text import read_text

DTYPES = ("float32", "float16", "bfloat16")


def versions() -> dict:
    """Versions of the libraries that shape the output."""
    import safetensors
    import transformers

    from . import __version__

    return {"lora_compress": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "safetensors": safetensors.__version__}


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
             stream: bool = False, dtype: str | None = None) -> CompressionReport:
    """Compress a checkpoint (folder, GGUF or Hub id) into a self-contained folder ``out``.

    ``stream`` reads and writes one tensor (plain SVD; implied under torchrun, see
    :mod:`lora_compress.streaming`) or one transformer block (calibrated methods, see
    :mod:`lora_compress.stream_calibrated`) at a time; ``dtype`` (float32, float16, bfloat16)
    casts the model first.

    Example:
        >>> report = compress("models/minilm", "out/minilm-50", CompressConfig(ratio=0.5))
        >>> model = load("out/minilm-50")

    Raises:
        LoraCompressError: bad input of any kind; nothing is written then.
    """
    check_output_folder(Path(out), force)
    calib_text = read_calibration_text(config.calib) if config.calib and config.method != "svd" else None
    if stream or launched():
        if config.method != "svd":
            return _compress_calibrated_streamed(model, out, config, calib_text, gguf_file=gguf_file, force=force,
                                                 command=command, progress=progress, dtype=dtype)
        return _compress_streamed(model, out, config, gguf_file=gguf_file, force=force, command=command,
                                  progress=progress, dtype=dtype)
    source = resolve_source(model, gguf_file)
    dense = load_dense(source, parse_dtype(dtype) or "auto")
    tokenizer = load_tokenizer(source)
    tokens = calibration_batch(tokenizer, calib_text, config) if calib_text is not None else None
    report = compress_(dense, config, progress=progress, tokens=tokens)
    manifest = build_manifest(source, dense, config, report, command)
    with atomic_folder(Path(out), force) as tmp:
        write_compressed(tmp, dense, manifest)
        _write_companions(tmp, source, dense, tokenizer, manifest, out)
    return report


def _write_companions(tmp: Path, source, model, tokenizer, manifest: dict, out) -> None:
    """Config, tokenizer, model card and report next to the weights."""
    copy_side_files(source, model, tokenizer, tmp)
    write_card(tmp, compressed_card(manifest), load_path=str(out))
    write_report(tmp, manifest)


def _compress_streamed(model: str, out, config: CompressConfig, *, gguf_file: str | None, force: bool, command,
                       progress: bool, dtype: str | None) -> CompressionReport:
    """Plain SVD, one tensor in memory at a time; under torchrun the layers are split, rank 0 writes."""
    group, report = join(config.device), None
    try:
        source = resolve_source(model, gguf_file)
        plan = streaming.plan(source, config, parse_dtype(dtype))
        if not group.is_writer:
            report = streaming.compress_streaming(plan, config, None, group, progress)
            return report
        with atomic_folder(Path(out), force) as tmp:
            report = streaming.compress_streaming(plan, config, tmp, group, progress)
            _write_streamed_companions(tmp, source, plan, report, command, load_tokenizer(source), out)
        return report
    finally:
        leave(group, finished=report is not None)


def _compress_calibrated_streamed(model: str, out, config: CompressConfig, calib_text: str | None, *,
                                  gguf_file: str | None, force: bool, command, progress: bool,
                                  dtype: str | None) -> CompressionReport:
    """A calibrated method with one transformer block in memory at a time, in one process."""
    if launched():
        raise LoraCompressError(f"--method {config.method} streams block by block in one process; drop torchrun "
                                f"(torchrun splits plain SVD only)")
    check_calibrated(config, calib_text)
    source = resolve_source(model, gguf_file)
    plan = streaming.plan(source, config, parse_dtype(dtype))
    blocks = Blocks(plan)
    tokenizer = load_tokenizer(source)
    tokens = calibration_batch(tokenizer, calib_text, config)
    with atomic_folder(Path(out), force) as tmp:
        report = compress_blockwise(blocks, config, tokens, tmp, progress)
        _write_streamed_companions(tmp, source, plan, report, command, tokenizer, out)
    return report


def _write_streamed_companions(tmp: Path, source, plan, report: CompressionReport, command, tokenizer, out) -> None:
    """Manifest, config, tokenizer, card and report next to streamed weights."""
    manifest = build_manifest(source, plan.model, report.config, report, command)
    write_manifest(tmp, manifest)
    _write_companions(tmp, source, plan.model, tokenizer, manifest, out)


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


def evaluate_folder(model: str, folder: str | Path, text_file: str | Path, *, gguf_file: str | None = None,
                    config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """Evaluate the compressed folder against its dense checkpoint on a text file.

    Returns the figures of :func:`lora_compress.evaluate.evaluate` plus ``disk`` (weight bytes)
    and ``ranks`` (per targeted layer, None = dense) and ``blocks`` (output drift per block,
    see :func:`lora_compress.drift.block_drift`).
    """
    text = read_text(text_file)
    manifest = read_manifest(Path(folder))
    source = resolve_source(model, gguf_file or manifest.get("gguf_file"))
    dense = load_dense(source)
    compressed = load(folder)
    tokenizer = load_tokenizer(source)
    figures = evaluate(dense, compressed, tokenizer, text, list(manifest["layers"]), config, progress)
    batches = drift_batches(tokenizer, text, figures["kind"] == "causal-lm",
                            tokens=fit_context(dense, min(DRIFT_TOKENS, config.window, config.max_tokens)))
    figures["blocks"] = block_drift(dense, compressed, batches)
    dense_bytes = weight_bytes(source.folder)
    compressed_bytes = weight_bytes(Path(folder))
    figures["disk"] = {"dense_bytes": dense_bytes, "compressed_bytes": compressed_bytes,
                       "ratio": compressed_bytes / dense_bytes}
    figures["ranks"] = {name: layer["rank"] for name, layer in manifest["layers"].items()}
    figures["model"], figures["compressed"], figures["text"] = source.name, str(folder), str(text_file)
    return figures


def write_json(figures: dict, path: str | Path) -> None:
    """Write figures as indented JSON."""
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
