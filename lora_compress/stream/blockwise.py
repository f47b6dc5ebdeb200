"""Calibrated compression (whiten, sequential, --budget) streamed one block at a time.

    pass 1, when Fisher moments are needed (sequential, or --budget):
      h_0 ─▶ block 0 ─▶ h_1 ─▶ … ─▶ h_N ─▶ head ─▶ loss     forward, keeping every h_i
      g_0 ◀─ block 0 ◀─ g_1 ◀─ … ◀─ g_N ◀──┘                 backward from the last block:
            each block read again and its forward recomputed with grad (activation checkpointing
            at block boundaries); hooks gather its Grams and Fisher moments as collect_statistics
            does, and its layers' costs (or rule ranks) are taken before it is freed.
    ranks: the budget allocated over all costs, or the per-layer rule.
    pass 2: block by block, read, gather statistics, factor (methods.calibrated.Factorer, and
            calibrate.closed_loop.sequential_block for sequential), write to the ShardWriter, free;
            then the targets outside the blocks (a pooler) from the head's forward.

Memory: the non-block tensors + one block + the tensor being written + calibration hidden states.
Pass 1 keeps all N+1 block-boundary states, (N+1) × samples × length × hidden × dtype bytes
(32 × 256 tokens of a 4096-wide bfloat16 model: 64 MiB per boundary, 2.1 GiB for 32 blocks),
plus one boundary of gradients; pass 2 keeps two streams (dense and compressed) and, inside
a block, the inputs of its groups, as the in-memory runner does.

Same numbers as the in-memory path: same batches in the same order, the same float64 sums,
the same hook code; see tests/test_streaming.py for the tolerance measured.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.blocks import block_hidden, call_block
from ..calibrate.closed_loop import sequential_block
from ..calibrate.statistics import GramHooks, Statistics, model_loss
from ..calibrate.tokens import batches
from ..methods.allocate import allocate
from ..methods.calibrated import Factorer, check_calibration_length
from ..methods.config import CompressConfig
from ..methods.ranks import layer_costs, rule_ranks
from ..methods.results import CompressionReport
from ..storage.shards import ShardWriter
from .block_loader import BlockLoader


def compress_blockwise(blocks: BlockLoader, config: CompressConfig, tokens: torch.Tensor, folder: Path,
                       progress: bool = True, max_shard_bytes: int | None = None) -> CompressionReport:
    """Factor every target of ``blocks.checkpoint`` by a calibrated method; write the weights into ``folder``.

    Args:
        blocks: the checkpoint's model, one block in memory at a time.
        config: a calibrated method and its rank option.
        tokens: calibration token ids, (samples, length).

    Returns:
        The CompressionReport, as :func:`lora_compress.methods.calibrated.compress_calibrated_` gives it.
    """
    start, targets = time.perf_counter(), blocks.checkpoint.targets
    check_calibration_length(blocks.model, tokens)
    calls = blocks.inputs(tokens, blocks.outside(targets))
    stats, ranks = _statistics_pass(blocks, calls, tokens, config, progress) if config.needs_gradients else (None, {})
    factorer = Factorer(blocks.model, config, targets, ranks, stats)
    writer = ShardWriter(folder, max_shard_bytes)
    compress_pass = _sequential_pass if config.record.closed_loop else _whiten_pass
    last = compress_pass(blocks, calls, factorer, writer, progress)
    ids = batches(tokens)
    outside = blocks.outside(targets)
    outside_stats, _ = _grams(outside, last, lambda i, h: blocks.head(ids[i], h))
    _factor(factorer, outside, outside_stats)
    for key, tensor in blocks.tensors():
        writer.add(key, tensor)
    writer.close()
    return factorer.report(tokens, start)


class _RankCollector:
    """What choosing ranks needs, gathered block by block: Fisher moments, and costs or rule ranks."""

    def __init__(self, config: CompressConfig, tokens: int):
        self.config, self.tokens = config, tokens
        self.fisher, self.costs, self.ranks = {}, {}, {}

    def add(self, modules: dict[str, nn.Module], stats: Statistics) -> None:
        """Take one block's statistics (its weights still loaded); its Grams are dropped with it."""
        self.fisher.update(stats.fisher)
        if self.config.budget is not None:
            self.costs.update(layer_costs(modules, stats))
        else:
            self.ranks.update(rule_ranks(self.config, modules, stats))

    def result(self, targets: dict[str, nn.Module]) -> tuple[Statistics, dict[str, int | None]]:
        """The Fisher moments and every target's rank, the budget allocated in model order as in memory."""
        if self.config.budget is not None:
            costs = {n: self.costs[n] for n in targets}
            ranks = allocate(costs, self.config.budget, self.config.allocation_max_keep)
        else:
            ranks = {n: self.ranks[n] for n in targets}
        return Statistics(fisher=self.fisher, tokens=self.tokens), ranks


def _statistics_pass(blocks: BlockLoader, calls: list, tokens: torch.Tensor, config: CompressConfig,
                     progress: bool) -> tuple[Statistics, dict[str, int | None]]:
    """Pass 1: forward keeping the block boundaries, loss at the head, backward block by block."""
    targets, ids, count = blocks.checkpoint.targets, batches(tokens), len(blocks.blocks)
    hidden = [block_hidden(calls[0])]  # hidden[i]: block i's inputs, one (B, T, C) tensor per batch
    for index in tqdm(range(count), desc="calibrating: forward", unit="block", disable=not progress):
        with blocks.loaded(index) as block:
            hidden.append([_forward(block, call, h) for call, h in zip(calls[index], hidden[-1])])
    collector, generator = _RankCollector(config, int(tokens.numel())), torch.Generator().manual_seed(0)
    grads = _backward(blocks.outside(targets), hidden.pop(), collector,
                      lambda i, x: (model_loss(blocks.head(ids[i], x), ids[i], generator), None))
    for index in tqdm(reversed(range(count)), total=count, desc="calibrating: backward", unit="block",
                      disable=not progress):
        with blocks.loaded(index) as block:
            grads = _backward(blocks.members(targets, index), hidden.pop(), collector,
                              lambda i, x, g=grads, c=calls[index]: (call_block(block, c[i], x), g[i]))
    return collector.result(targets)


def _forward(block: nn.Module, call: tuple, hidden: torch.Tensor) -> torch.Tensor:
    """The block's output, computed with grad as the in-memory Fisher pass computes it."""
    with torch.enable_grad():
        return call_block(block, call, hidden.detach().requires_grad_(True)).detach()


def _backward(modules: dict[str, nn.Module], inputs: list[torch.Tensor], collector: _RankCollector, run) -> list[torch.Tensor]:
    """The gradient at each input x, from ``run(i, x)`` → (output, its gradient or None for a loss).

    Gram and Fisher hooks on ``modules`` see the recomputed forward and the backward; their
    statistics go to ``collector``.
    """
    stats = Statistics(tokens=collector.tokens)
    hooks = GramHooks(stats, modules, fisher=True)
    grads = []
    try:
        for index, hidden in enumerate(inputs):
            x = hidden.detach().requires_grad_(True)
            with torch.enable_grad():
                torch.autograd.backward(*run(index, x))
            grads.append(x.grad)
            hooks.last = (None, None)
    finally:
        hooks.remove()
    stats.shrink_fisher()
    collector.add(modules, stats)
    return grads


@torch.no_grad()
def _grams(modules: dict[str, nn.Module], inputs: list[torch.Tensor], run) -> tuple[Statistics, list]:
    """Input Grams of ``modules`` over ``run(i, h)`` for each input h; and the outputs of ``run``."""
    stats = Statistics()
    hooks = GramHooks(stats, modules)
    outputs = []
    try:
        for index, hidden in enumerate(inputs):
            outputs.append(run(index, hidden))
            hooks.last = (None, None)
    finally:
        hooks.remove()
    return stats, outputs


def _factor(factorer: Factorer, modules: dict[str, nn.Module], stats: Statistics) -> None:
    """Factor ``modules`` on their Grams; those without a rank yet get the config's rule rank."""
    unplanned = {n: m for n, m in modules.items() if n not in factorer.ranks}
    factorer.ranks.update(rule_ranks(factorer.config, unplanned, stats))
    for name in modules:
        factorer(name, stats.gram(name))


def _sequential_pass(blocks: BlockLoader, calls: list, factorer: Factorer, writer: ShardWriter,
                     progress: bool) -> list[torch.Tensor]:
    """Pass 2 of sequential methods; returns the compressed stream's last hidden states."""
    compressed = block_hidden(calls[0])
    dense = compressed if factorer.method.dense_stream else None  # the dense stream serves only the refit
    for index in tqdm(range(len(blocks.blocks)), desc="compressing blocks", unit="block", disable=not progress):
        with blocks.loaded(index) as block:
            dense, compressed = sequential_block(blocks.blocks[index][0], block, factorer.targets, calls[index],
                                                 dense, compressed, factorer.group)
            for key, tensor in blocks.tensors(index):
                writer.add(key, tensor)
    return compressed


def _whiten_pass(blocks: BlockLoader, calls: list, factorer: Factorer, writer: ShardWriter,
                 progress: bool) -> list[torch.Tensor]:
    """Pass 2 of whitening: dense Grams per block, then factor; returns the dense last hidden states."""
    hidden = block_hidden(calls[0])
    for index in tqdm(range(len(blocks.blocks)), desc="compressing blocks", unit="block", disable=not progress):
        with blocks.loaded(index) as block:
            stats, hidden = _grams(blocks.members(factorer.targets, index), hidden,
                                   lambda i, h, c=calls[index]: call_block(block, c[i], h))
            _factor(factorer, blocks.members(factorer.targets, index), stats)
            for key, tensor in blocks.tensors(index):
                writer.add(key, tensor)
    return hidden
