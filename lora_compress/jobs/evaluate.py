"""``evaluate_folder(BASE, DIR, text, tasks=…)``: a compressed folder against its dense base.

    BASE (checked against the manifest) and DIR ──▶ on --text: drift, perplexity, drift per block
                                                 ──▶ on --tasks: lm-eval accuracies, side by side
                                                 ──▶ counts and bytes ──▶ DIR/report/ and DIR/README.md
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

from torch import nn

from ..errors import LoraCompressError, LoraCompressWarning
from ..evaluation.drift import DRIFT_TOKENS, block_drift, drift_batches
from ..evaluation.lm_eval_tasks import TaskConfig, task_accuracy
from ..evaluation.metrics import EvalConfig, count_summary, evaluate, fit_context
from ..methods.registry import get_method
from ..report.folder import check_report_place, report_fix, report_images, write_report
from ..storage.card import compressed_card, write_card
from ..storage.checkpoint import Source, is_causal_lm, load_dense, load_tokenizer, resolve_source
from ..storage.compressed import load, read_manifest, weight_bytes
from ..storage.manifest import Manifest
from ..storage.output import atomic_file, check_file_output
from ..storage.text import read_text


def evaluate_folder(model: str, folder: str | Path, text_file: str | Path | None = None, *,
                    gguf_file: str | None = None, config: EvalConfig = EvalConfig(),
                    tasks: TaskConfig | None = None, progress: bool = True) -> dict:
    """Evaluate the compressed folder against its dense checkpoint on a text file and/or lm-eval tasks.

    Returns:
        ``kind``, ``params``, ``disk`` (weight bytes) and ``ranks`` (per targeted layer, None = dense);
        with ``text_file`` the figures of :func:`lora_compress.evaluate` and ``blocks`` (output drift per
        block, :func:`lora_compress.block_drift`); with ``tasks`` the lm-eval scores under ``tasks``
        (:func:`lora_compress.evaluation.lm_eval_tasks.task_accuracy`).

    Example:
        >>> evaluate_folder("models/smol", "out/smol-80", "alice29.txt")["perplexity"]
        >>> evaluate_folder("models/smol", "out/smol-80", tasks=TaskConfig(("movie_sentiment",), limit=200))

    Raises:
        LoraCompressError: neither text nor tasks, BASE of another architecture or vocabulary, bad input.
    """
    if text_file is None and tasks is None:
        raise LoraCompressError("nothing to measure; give --text FILE, --tasks T[,T...], or both")
    text = read_text(text_file) if text_file is not None else None
    manifest = read_manifest(Path(folder))
    source = resolve_source(model, gguf_file or manifest.gguf_file)
    dense, compressed = load_dense(source), load(folder)
    check_same_architecture(dense, compressed, manifest, source.name)
    warn_other_base(source, manifest, folder)
    tokenizer, targets = load_tokenizer(source), list(manifest.layers)
    figures = {"kind": "causal-lm" if is_causal_lm(dense) else "encoder"}
    if text is not None:
        figures.update(evaluate(dense, compressed, tokenizer, text, targets, config, progress))
        batches = drift_batches(tokenizer, text, figures["kind"] == "causal-lm",
                                tokens=fit_context(dense, min(DRIFT_TOKENS, config.window, config.max_tokens)))
        figures["blocks"] = block_drift(dense, compressed, batches)
        figures["text"] = str(text_file)
    if tasks is not None:
        figures["tasks"] = task_accuracy(dense, compressed, tokenizer, tasks, progress)
    figures["params"] = count_summary(dense, compressed, targets)
    figures["disk"] = disk_figures(source.folder, Path(folder))
    figures["ranks"] = {name: layer.rank for name, layer in manifest.layers.items()}
    figures["model"], figures["compressed"] = source.name, str(folder)
    return figures


def warn_other_base(source: Source, manifest: Manifest, folder) -> None:
    """One warning line when BASE is neither the folder nor the name the manifest records."""
    recorded = manifest.base_model_folder
    same_folder = recorded is not None and os.path.exists(recorded) and Path(recorded).resolve() == source.folder
    if not same_folder and source.name != manifest.base_model:
        warnings.warn(f"BASE {source.name} is not the base model recorded in {folder} ({manifest.base_model}); "
                      f"the figures compare against {source.name}", LoraCompressWarning, stacklevel=3)


def check_same_architecture(dense: nn.Module, compressed: nn.Module, manifest: Manifest, name: str) -> None:
    """Refuse a BASE that is not the architecture and vocabulary the folder was compressed from.

    Raises:
        LoraCompressError: naming what differs and the base to pass instead.
    """
    problem = None
    if type(dense).__name__ != manifest.model_class:
        problem = f"it is a {type(dense).__name__}, the folder a {manifest.model_class}"
    elif dense.get_input_embeddings().weight.shape != compressed.get_input_embeddings().weight.shape:
        problem = (f"its vocabulary × width is {tuple(dense.get_input_embeddings().weight.shape)}, the folder's "
                   f"{tuple(compressed.get_input_embeddings().weight.shape)}")
    else:
        modules = dict(dense.named_modules())
        experts = tuple(f"{name}." for name in manifest.experts)  # split only in the compressed model
        missing = [name for name in manifest.experts if name not in modules]
        if missing:
            problem = f"it has no experts module {missing[0]}"
        for layer, entry in manifest.layers.items():
            if problem or layer.startswith(experts):
                continue
            shape = _shape(modules.get(layer))
            if shape != entry.shape:
                problem = f"its {layer} is {'missing' if shape is None else '×'.join(map(str, shape))}, " \
                          f"the folder's {'×'.join(map(str, entry.shape))}"
                break
    if problem:
        raise LoraCompressError(f"BASE {name} is not the model this folder was compressed from ({problem}); pass "
                                f"its base, {manifest.base_model}")


def _shape(module: nn.Module | None) -> tuple[int, int] | None:
    """(out, in) of a dense linear or Conv1D layer (Conv1D stores in×out)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    return tuple(weight.shape[::-1]) if hasattr(module, "nf") else tuple(weight.shape)


def disk_figures(dense_folder: Path, folder: Path) -> dict:
    """Weight bytes on disk of both (adapters file excluded), and their ratio."""
    dense_bytes, compressed_bytes = weight_bytes(dense_folder), weight_bytes(folder)
    return {"dense_bytes": dense_bytes, "compressed_bytes": compressed_bytes, "ratio": compressed_bytes / dense_bytes}


def check_evaluation_outputs(folder: str | Path, json_path: str | Path | None = None, report: bool = True) -> None:
    """Before any compute: the folder is a compressed one, ``json_path`` can be written, and (with
    ``report``) so can the folder's report.

    Raises:
        LoraCompressError: naming the output and the fix.
    """
    read_manifest(Path(folder))
    if json_path is not None:
        check_file_output(json_path, "--json")
    if report:
        check_report_place(folder)


def record_evaluation(folder: str | Path, figures: dict, command: str | None = None) -> Path:
    """Write the figures into ``folder``: the report (report.md/json and plots) and the model card.

    Returns:
        The report folder.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    report = write_report(folder, evaluation=figures, evaluate_command=command, fix=report_fix(folder))
    card = compressed_card(manifest, _summary(manifest.method), figures, report_images(folder))
    if command:
        card = replace(card, notes=(*card.notes, f"Figures measured with `{command}`."))
    write_card(folder, card, load_path=str(folder))
    return report


def _summary(method: str) -> str | None:
    """The registry's one line on a method (None for one not registered in this process)."""
    try:
        return get_method(method).summary
    except LoraCompressError:
        return None


def write_json(figures: dict, path: str | Path) -> None:
    """Write figures as indented JSON (whole or not at all).

    Raises:
        LoraCompressError: ``path`` is a folder, lies in a missing one, or cannot be written.
    """
    with atomic_file(path, "--json") as tmp:
        tmp.write_text(json.dumps(figures, indent=2) + "\n")

