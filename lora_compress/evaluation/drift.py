"""Where does the error enter? Output drift of each transformer block, dense vs compressed.

Forward hooks on the repeated blocks (calibrate/blocks.py: ``model.layers``, ``encoder.layer``,
``transformer.h``) of both models, fed the same inputs. Two figures per block, both relative Frobenius errors of
the block's output hidden states against the dense model's (padding tokens left out):

    cumulative  compressed model run end to end: the error carried up to this block
    local       the compressed block fed the *dense* block's input: the error this block adds

A cumulative curve that jumps where the local one is high points at the block to spare.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.blocks import block_stack
from ..calibrate.seq2seq import decoder_input_ids, is_encoder_decoder
from ..storage.text import paragraphs as split_paragraphs

DRIFT_TOKENS = 512  # causal LMs: tokens of text in the one drift forward


def _hidden(output) -> torch.Tensor:
    """A block's output hidden states, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def _recording(blocks: nn.ModuleList, calls: list, outputs: list):
    """Record each block's (args, kwargs) into ``calls`` and its output into ``outputs``."""
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, kwargs, i=index: calls.__setitem__(i, (args, kwargs)), with_kwargs=True))
        handles.append(block.register_forward_hook(
            lambda _m, _args, output, i=index: outputs.__setitem__(i, _hidden(output).detach().float())))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Sums:
    """Running Σ‖diff‖² and Σ‖ref‖² per block, over masked tokens."""

    def __init__(self, count: int):
        self.diff, self.ref = [0.0] * count, [0.0] * count

    def add(self, index: int, got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor | None):
        diff, ref = got - want, want  # (B, T, C)
        if mask is not None:
            diff, ref = diff[mask], ref[mask]  # (tokens, C)
        self.diff[index] += diff.pow(2).sum().item()
        self.ref[index] += ref.pow(2).sum().item()

    def errors(self) -> list[float]:
        return [(d / r) ** 0.5 if r > 0 else 0.0 for d, r in zip(self.diff, self.ref)]


@torch.no_grad()
def block_drift(dense: nn.Module, compressed: nn.Module, batches: list[dict], progress: bool = False) -> dict | None:
    """Relative output error of every block of ``compressed`` against ``dense``.

    Args:
        dense, compressed: models of one architecture (compressed = some layers factored).
        batches: model inputs (dicts of tensors, e.g. tokenizer output); an ``attention_mask``
            entry keeps padding tokens out of the sums.
        progress: a progress bar over the blocks replayed.

    Returns:
        ``{"stack": "model.layers", "tokens": N, "cumulative": [e0, e1, ...], "local": [...]}``,
        one entry per block, in order; None when the model has no stack of blocks.

    Example:
        >>> drift = block_drift(dense, load("out"), [tokenizer("Some text", return_tensors="pt")])
        >>> max(drift["local"])
    """
    if block_stack(dense) is None:
        return None
    stack, dense_blocks = block_stack(dense)
    compressed_blocks = compressed.get_submodule(stack)
    count = len(dense_blocks)
    cumulative, local, tokens = _Sums(count), _Sums(count), 0
    bar = tqdm(total=count * len(batches), desc="drift per block", unit="block", disable=not progress)
    for inputs in batches:
        if is_encoder_decoder(dense) and "decoder_input_ids" not in inputs:  # the decoder reads the text shifted
            inputs = {**inputs, "decoder_input_ids": decoder_input_ids(dense, inputs["input_ids"])}
        calls, dense_out, compressed_out = [None] * count, [None] * count, [None] * count
        with _recording(dense_blocks, calls, dense_out):
            dense.base_model(**inputs)  # the body only: an LM head adds cost, not information
        with _recording(compressed_blocks, [None] * count, compressed_out):
            compressed.base_model(**inputs)
        mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None  # (B, T)
        for index, (args, kwargs) in enumerate(calls):
            replay = _hidden(compressed_blocks[index](*args, **kwargs)).float()
            cumulative.add(index, compressed_out[index], dense_out[index], mask)
            local.add(index, replay, dense_out[index], mask)
            bar.update()
        tokens += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
    bar.close()
    return {"stack": stack, "tokens": tokens, "cumulative": cumulative.errors(), "local": local.errors()}


def drift_batches(tokenizer, text: str, causal: bool, tokens: int = DRIFT_TOKENS, paragraphs: int = 32,
                  max_length: int = 128) -> list[dict]:
    """Inputs for :func:`block_drift` from real text.

    Causal LMs: the first ``tokens`` tokens in one sequence (no KV cache, so each block can be
    replayed alone). Encoders: the first ``paragraphs`` paragraphs, padded, one batch.
    """
    if causal:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]  # (1, T)
        return [{"input_ids": ids, "use_cache": False}]
    chunks = split_paragraphs(text)[:paragraphs] or [text.strip()]
    return [dict(tokenizer(chunks, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))]


def describe(drift: dict) -> str:
    """One sentence: where the largest local error enters, and the error at the last block."""
    worst = max(range(len(drift["local"])), key=lambda i: drift["local"][i])
    return (f"largest local error {drift['local'][worst]:.3g} enters at block {worst} of {len(drift['local'])}; "
            f"error at the last block {drift['cumulative'][-1]:.3g} ({drift['tokens']:,} tokens)")
