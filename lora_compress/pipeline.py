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
                         read_manifest, resolve_source, write_compressed, FORMAT_VERSION, check_output_folder)
from .card import compressed_card, write_card
from .compress import CompressConfig, CompressionReport, compress_
from .counting import weight_bytes
from .drift import block_drift, drift_batches
from .evaluate import EvalConfig, evaluate
from .report import write_report
from .text import read_text


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
        "gguf_file": source.gguf_file,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "method": config.method,
        "settings": config.settings(),
        "command": command or " ".join(sys.argv),
        "versions": versions(),
        "targeted_params": {"dense": report.dense_params, "compressed": report.params},
        "layers": report.manifest_layers(),
    }


def compress(model: str, out: str | Path, config: CompressConfig, *, gguf_file: str | None = None,
             force: bool = False, command: str | None = None, progress: bool = True) -> CompressionReport:
    """Compress a checkpoint (folder, GGUF or Hub id) into a self-contained folder ``out``.

    Example:
        >>> report = compress("models/minilm", "out/minilm-50", CompressConfig(ratio=0.5))
        >>> model = load("out/minilm-50")

    Raises:
        LoraCompressError: bad input of any kind; nothing is written then.
    """
    check_output_folder(Path(out), force)
    source = resolve_source(model, gguf_file)
    dense = load_dense(source)
    tokenizer = load_tokenizer(source)
    report = compress_(dense, config, progress=progress)
    manifest = build_manifest(source, dense, config, report, command)
    with atomic_folder(Path(out), force) as tmp:
        copy_side_files(source, dense, tokenizer, tmp)
        write_compressed(tmp, dense, manifest)
        write_card(tmp, compressed_card(manifest), load_path=str(out))
        write_report(tmp, manifest)
    return report


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
    figures["blocks"] = block_drift(dense, compressed, drift_batches(tokenizer, text, figures["kind"] == "causal-lm"))
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
