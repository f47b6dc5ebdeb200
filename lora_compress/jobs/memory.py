"""Know before you start: the peak memory of each compression path, from shapes and the calibration size.

    in memory   the checkpoint in its dtype + one block in the compute dtype + the working set
    streamed    the tensors outside the blocks + one block in the compute dtype + the working set
    working set the calibration hidden states and gradients, one block's activations for a batch, one
                block's statistics (input Grams in float64, gradient covariances in float32), the widest
                layer's factoring, the LM head's loss a block of the vocabulary at a time, and what the
                first pass leaves for the second (on disk past calibrate/spill.SPILL_BYTES)

Plain SVD holds the checkpoint (in memory) or one tensor (streamed) and a working set per worker.
The figures are estimates of the largest terms, a little above what runs measure (benchmarks/scale.md);
they are compared with the memory this process may still take (psutil) or with --memory-limit.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from ..calibrate.blocks import find_blocks
from ..calibrate.collectors import statistics_bytes
from ..calibrate.head_loss import BLOCK_ELEMENTS, VOCAB_BLOCK, supports_chunked_loss
from ..calibrate.spill import SPILL_BYTES
from ..calibrate.tokens import BATCH_SAMPLES
from ..core.experts import experts_by_matrix
from ..core.layers import dense_weight
from ..core.precision import compute_dtype
from ..core.workers import layer_workers
from ..errors import OptionError
from ..methods.config import RunConfig
from ..pipelines.passes import PassPlan
from ..pipelines.plan import CALIBRATED, Plan

BASELINE = 3 << 28  # the process with torch, transformers and the tokenizer loaded (0.45 GiB measured), its thread
# pools and allocator slack: 0.75 GiB (0.5 left the estimate 0.16 GiB under the SmolLM2 in-memory run)
GIB = 1 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of each path, and the largest parts of the in-memory one (for messages)."""

    in_memory: int
    streamed: int
    parts: dict[str, int]

    def describe(self) -> str:
        listed = ", ".join(f"{name} {gib(size)}" for name, size in self.parts.items())
        return f"in memory {gib(self.in_memory)} ({listed}), streamed {gib(self.streamed)}"


def gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def parse_size(text: str) -> int:
    """``"20G"``, ``"512M"``, ``"1.5GiB"`` or a plain byte count → bytes.

    Raises:
        LoraCompressError: not a size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise OptionError(f"{{memory_limit}} {text!r} is not a size; pass e.g. 20G or 512M")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def available_bytes() -> int:
    """What this process may still grow to: its resident memory now + what the system has available."""
    return psutil.Process().memory_info().rss + psutil.virtual_memory().available


def estimate(model: nn.Module, plan: Plan, targets: dict[str, nn.Module],
             storage_dtype: torch.dtype) -> MemoryEstimate:
    """Peak bytes of the in-memory and the streamed path for ``model`` (its parameters may be on meta)."""
    checkpoint = _bytes(model.parameters(), storage_dtype) + _bytes(model.buffers(), storage_dtype)
    if plan.pipeline != CALIBRATED:
        return _plain(checkpoint, plan.run, targets)
    device = torch.device(plan.run.device)
    dtype = compute_dtype(storage_dtype, device)
    blocks = find_blocks(model)
    block = max((_bytes(b.parameters(), dtype) for _, b in blocks), default=0)
    outside = checkpoint - sum(_bytes(b.parameters(), storage_dtype) for _, b in blocks)
    passes = PassPlan.of(plan.config, experts=bool(experts_by_matrix(model, targets)))
    work = _working_set(model, plan.run, passes, targets, dtype, blocks)
    copy = block if dtype != storage_dtype else 0  # the block worked on, cast from the checkpoint's dtype
    parts = {"checkpoint": checkpoint, "one block in the compute dtype": copy, "calibration working set": work}
    return MemoryEstimate(BASELINE + checkpoint + copy + work, BASELINE + outside + block + work,
                          {k: v for k, v in parts.items() if v})


def _plain(checkpoint: int, run: RunConfig, targets: dict[str, nn.Module]) -> MemoryEstimate:
    """A data-free method: per worker, the widest weight in float32 and its SVD's workspace (about 3 copies)."""
    shapes = [tuple(dense_weight(m).shape) for m in targets.values()]
    workers = layer_workers(run.workers, shapes, run.device)
    layer = 3 * 4 * max((math.prod(s) for s in shapes), default=0) * workers
    return MemoryEstimate(BASELINE + checkpoint + layer, BASELINE + 2 * layer,
                          {"checkpoint": checkpoint, "factoring": layer})


def _working_set(model: nn.Module, run: RunConfig, passes: PassPlan, targets: dict[str, nn.Module],
                 dtype: torch.dtype, blocks: list) -> int:
    """Bytes a calibrated run adds to the weights it holds (module docstring); the statistics are what the
    passes declare (pipelines/passes.py), the same declarations the pipeline runs."""
    item = torch.finfo(dtype).bits // 8
    tokens = run.calib_samples * run.calib_len
    width = getattr(model.config, "hidden_size", None) or max(dense_weight(m).shape[1] for m in targets.values())
    streams = 3 if passes.dense_stream else 2  # compressed (and dense) stream + the one being made
    hidden = tokens * width * item * (streams + 1)  # + the gradients at a block boundary
    boundaries = (len(blocks) + 1) * tokens * width * item
    shapes = [tuple(dense_weight(m).shape) for m in targets.values()]
    kept = sum(statistics_bytes([shape], passes.kept) for shape in shapes)
    pass_kept = min(boundaries, SPILL_BYTES) + min(kept, SPILL_BYTES) if passes.gradient_pass else 0
    statistics = _block_statistics(targets, passes, blocks)
    return hidden + pass_kept + _activations(model, width, item, run.calib_len) + statistics + \
        _factoring(targets) + _head_loss(model, run.calib_len, width)


def _activations(model: nn.Module, width: int, item: int, length: int) -> int:
    """One block's forward-and-backward activations for one batch of BATCH_SAMPLES sequences (a generous
    count of the tensors a decoder block keeps: 16 of the width, 4 of the MLP's, the attention weights)."""
    config = model.config
    intermediate = getattr(config, "intermediate_size", 4 * width)
    heads = getattr(config, "num_attention_heads", 1)
    return BATCH_SAMPLES * length * item * (16 * width + 4 * intermediate + 2 * heads * length)


def _block_statistics(targets: dict[str, nn.Module], passes: PassPlan, blocks: list) -> int:
    """The largest block's statistics in either pass, as the passes declare them."""
    prefixes = [name + "." for name, _ in blocks] or [""]
    by_block = [[tuple(dense_weight(m).shape) for n, m in targets.items() if n.startswith(p)] for p in prefixes]
    return max((max(statistics_bytes(shapes, passes.gradient_pass, peak=True),
                    statistics_bytes(shapes, passes.fit_pass, peak=True)) for shapes in by_block if shapes), default=0)


def _factoring(targets: dict[str, nn.Module]) -> int:
    """The widest layer's factoring in float64: its Gram's Cholesky (tall layers) or W·C, W·C·Wᵀ and its
    eigenvectors (output route), W itself."""
    largest = 0
    for module in targets.values():
        out, inp = dense_weight(module).shape
        route = 8 * inp * inp if out > inp else 8 * (2 * out * out)
        largest = max(largest, route + 3 * 8 * out * inp)
    return largest


def _head_loss(model: nn.Module, length: int, width: int) -> int:
    """The LM head's loss for a batch: a block of logits, a block of the head in float32 and a few
    (rows × width) tensors (head_loss.py); a head without it makes its logits whole, three times over."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return 0
    vocab, rows = head.weight.shape[0], BATCH_SAMPLES * length
    if not supports_chunked_loss(model):
        return 3 * 4 * rows * vocab
    return 4 * (BLOCK_ELEMENTS + min(VOCAB_BLOCK, vocab) * width + 4 * rows * width)


def _bytes(tensors, dtype: torch.dtype) -> int:
    """Bytes of ``tensors`` with their floats in ``dtype`` (each shared tensor once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        item = torch.finfo(dtype).bits // 8 if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * item
    return total


def choose_path(found: MemoryEstimate, stream: bool, limit: int | None) -> bool:
    """Whether to stream: as asked if that fits, streamed when only that fits; ``limit`` caps the memory.

    Raises:
        OptionError: no path fits, before any compute.
    """
    budget = limit if limit is not None else available_bytes()
    source = f"{{memory_limit}} {gib(budget)}" if limit is not None else f"{gib(budget)} available"
    if not stream and found.in_memory <= budget:
        return False
    if found.streamed <= budget:
        return True
    raise OptionError(f"compressing needs about {gib(found.streamed if stream else found.in_memory)} "
                      f"({found.describe()}) but {source}; pass fewer {{calib_samples}} or a shorter {{calib_len}}, "
                      f"or run on a machine with more memory")  # streaming was tried above
