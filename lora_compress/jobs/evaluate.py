"""``evaluate_folder(BASE, DIR, text)``: a compressed folder against its dense base on real text."""
from __future__ import annotations

import json
from pathlib import Path

from ..evaluation.drift import DRIFT_TOKENS, block_drift, drift_batches
from ..evaluation.metrics import EvalConfig, evaluate, fit_context
from ..storage.checkpoint import load_dense, load_tokenizer, resolve_source
from ..storage.compressed import load, read_manifest, weight_bytes
from ..storage.text import read_text


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
