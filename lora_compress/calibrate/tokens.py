"""Calibration text → token batches: evenly spread sequences, cut into forward-sized batches."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import LoraCompressError
from ..storage.text import read_text


BATCH_SAMPLES = 4  # sequences per forward while calibrating (bounds activation memory)



def calibration_tokens(tokenizer, text: str, samples: int, length: int) -> torch.Tensor:
    """``samples`` sequences of ``length`` tokens, taken evenly spread over ``text``.

    Returns:
        Token ids, (samples, length).

    Raises:
        LoraCompressError: the text holds fewer than samples × length tokens.
    """
    ids = tokenizer(text, return_tensors="pt", truncation=False)["input_ids"][0]  # (N,)
    needed = samples * length
    if len(ids) < needed:
        raise LoraCompressError(f"calibration text has {len(ids):,} tokens but --calib-samples {samples} × "
                                f"--calib-len {length} needs {needed:,}; pass a longer text or fewer/shorter samples")
    starts = torch.linspace(0, len(ids) - length, samples).long()
    return torch.stack([ids[s: s + length] for s in starts.tolist()])  # (samples, length)



def batches(tokens: torch.Tensor, size: int = BATCH_SAMPLES) -> list[torch.Tensor]:
    """Rows of ``tokens`` in chunks of ``size``."""
    return list(tokens.split(size))



def read_calibration_text(source: str) -> str:
    """Calibration text from a file (plain text or .jsonl), or a ``datasets`` name when available.

    Raises:
        LoraCompressError: missing, empty or non-UTF-8 file, and no such dataset.
    """
    if Path(source).exists() or not _datasets_available():
        return read_text(source, "--calib")
    try:
        from datasets import load_dataset

        rows = load_dataset(source, split="train")
        return "\n\n".join(str(t) for t in rows["text"] if str(t).strip())
    except Exception:  # datasets raises many types; all mean "not available here"
        return read_text(source, "--calib")



def _datasets_available() -> bool:
    return importlib.util.find_spec("datasets") is not None
