"""Calibration text → token batches: the one calibration tokenizer, and forward-sized batches."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import LoraCompressError, OptionError
from ..storage.text import read_text


BATCH_SAMPLES = 4  # sequences per forward while calibrating (bounds activation memory)



def calibration_tokens(tokenizer, text: str, samples: int | None, length: int, consecutive: bool = False,
                       least: int = 1) -> torch.Tensor:
    """Calibration sequences of ``length`` tokens of ``text``: the one calibration tokenizer of compress,
    inspect, extract and heal. ``samples`` sequences evenly spread over the text, or, ``consecutive``, the
    first ones back to back (as many as the text holds when ``samples`` is None; at least ``least``).

    Returns:
        Token ids, (samples, length).

    Raises:
        LoraCompressError: no tokenizer, or a text too short for the sequences asked.
    """
    if tokenizer is None:
        raise LoraCompressError("the model folder has no tokenizer to cut calibration text into tokens; copy its "
                                "tokenizer files next to config.json")
    ids = tokenizer(text, return_tensors="pt", truncation=False)["input_ids"][0]  # (N,)
    if consecutive:
        count = len(ids) // length if samples is None else min(len(ids) // length, samples)
        if count < least:
            raise OptionError(f"the calibration text holds {len(ids):,} tokens; {least} sequences of {{calib_len}} "
                              f"{length} need {least * length:,}; pass a longer text or a shorter {{calib_len}}")
        return with_bos(ids[: count * length].view(count, length), tokenizer)  # (count, length)
    needed = samples * length
    if len(ids) < needed:
        raise OptionError(f"calibration text has {len(ids):,} tokens but {{calib_samples}} {samples} × "
                          f"{{calib_len}} {length} needs {needed:,}; pass a longer text or fewer/shorter samples")
    starts = torch.linspace(0, len(ids) - length, samples).long()
    return with_bos(torch.stack([ids[s: s + length] for s in starts.tolist()]), tokenizer)  # (samples, length)


def with_bos(rows: torch.Tensor, tokenizer) -> torch.Tensor:
    """``rows`` (N, T) with each row's first token replaced by the BOS token when ``tokenizer`` starts its
    encodings with one (Gemma does, SmolLM2 and BERT's [CLS] tokenizers do not): rows cut from the middle of
    a long text otherwise lack it, and a model trained to see BOS first computes activations off its
    distribution without it (issue 23; a first, unmerged measurement: Gemma-3-270m at a 20% cut, worst
    held-out domain 5.76× → 4.65× dense)."""
    bos = bos_added(tokenizer)
    if bos is None:
        return rows
    rows = rows.clone()
    rows[:, 0] = bos
    return rows


def bos_added(tokenizer) -> int | None:
    """The BOS token id ``tokenizer`` puts first in its encodings, or None when it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if len(ids) and int(ids[0]) == bos else None


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
