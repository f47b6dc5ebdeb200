"""The gradient pass: every layer's input Gram and output-gradient moments F, one block at a time.

    h_0 ─▶ block 0 ─▶ h_1 ─▶ … ─▶ h_N ─▶ head ─▶ loss     forward, keeping every h_i (spilled when large)
    g_0 ◀─ block 0 ◀─ g_1 ◀─ … ◀─ g_N ◀──┘                 backward from the last block: each block's
                                                         forward recomputed with grad (activation
                                                         checkpointing at block boundaries)

Hooks sum a block's statistics during its recomputed forward and its backward; they go to
``collect(modules, stats)`` while the block is still loaded and are dropped after, so the pass
holds one block's statistics at a time. The unavoidable work is one forward and one backward over
the calibration tokens; the recomputation adds a forward, the price of keeping only the block
boundaries. A causal LM's loss comes from the head's inputs a block of the vocabulary at a time
(head_loss.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .block_source import BlockSource
from .blocks import block_hidden, call_block
from .head_loss import next_token_loss, supports_chunked_loss
from .spill import Spill
from .statistics import FULL_FISHER_MAX, GramHooks, Statistics, model_loss
from .timing import StageTimer
from .tokens import batches

Collect = Callable[[dict[str, nn.Module], Statistics], None]  # (a block's targets, their statistics)


def gradient_pass(source: BlockSource, calls: list, tokens: torch.Tensor, targets: dict[str, nn.Module],
                  collect: Collect, spill: Spill, timer: StageTimer, progress: bool = True,
                  full_fisher_max: int = FULL_FISHER_MAX, output_side: bool = False) -> None:
    """Run pass 1 over every block of ``source`` (see the module docstring); with ``output_side``, layers
    with out ≤ in sum the Gram of their outputs rather than their inputs (calibrate/statistics.py)."""
    ids, count = batches(tokens), len(source.blocks)
    hidden = block_hidden(calls[0])  # block 0's inputs, one (B, T, C) tensor per batch
    with timer.stage("forward"):
        for index in tqdm(range(count), desc="calibrating: forward", unit="block", disable=not progress):
            spill.put_list(f"hidden-{index}", hidden)
            with source.loaded(index) as block:
                hidden = [_forward(block, call, h) for call, h in zip(calls[index], hidden)]
    loss = _loss(source, ids)
    backward = _Backward(tokens.numel(), collect, timer, full_fisher_max, output_side)
    with timer.stage("backward"):
        grads = backward(source.outside(targets), hidden, lambda i, x: (loss(i, x), None))
        for index in tqdm(reversed(range(count)), total=count, desc="calibrating: backward", unit="block",
                          disable=not progress):
            inputs = spill.take_list(f"hidden-{index}")
            with source.loaded(index) as block:
                grads = backward(source.members(targets, index), inputs,
                                 lambda i, x, g=grads, c=calls[index]: (call_block(block, c[i], x), g[i]))


def _loss(source: BlockSource, ids: list[torch.Tensor]):
    """``loss(i, x)``: the calibration loss of batch i from the last block's output x (summed over tokens)."""
    generator = torch.Generator().manual_seed(0)
    if getattr(source.model, "get_output_embeddings", lambda: None)() is not None and \
            supports_chunked_loss(source.model):
        head = source.model.get_output_embeddings()
        return lambda i, x: next_token_loss(source.head(ids[i], x, features=True).logits, head, ids[i], generator)
    return lambda i, x: model_loss(source.head(ids[i], x), ids[i].to(x.device), generator)


def _forward(block: nn.Module, call: tuple, hidden: torch.Tensor) -> torch.Tensor:
    """The block's output, computed with grad as the recomputed forward of the backward computes it."""
    with torch.enable_grad():
        return call_block(block, call, hidden.detach().requires_grad_(True)).detach()


class _Backward:
    """The gradient at each input x of a stretch of the model, with hooks gathering its statistics."""

    def __init__(self, tokens: int, collect: Collect, timer: StageTimer, full_fisher_max: int, output_side: bool):
        self.tokens, self.collect, self.timer, self.full_fisher_max = tokens, collect, timer, full_fisher_max
        self.output_side = output_side

    def __call__(self, modules: dict[str, nn.Module], inputs: list[torch.Tensor], run) -> list[torch.Tensor]:
        """``run(i, x)`` → (output, its gradient, or None for a loss); returns the gradients at the inputs."""
        stats = Statistics(tokens=self.tokens)
        hooks = GramHooks(stats, modules, fisher=True, full_fisher_max=self.full_fisher_max, timer=self.timer,
                          output_side=self.output_side)
        grads = []
        try:
            for index, hidden in enumerate(inputs):
                x = hidden.detach().requires_grad_(True)
                with torch.enable_grad():
                    torch.autograd.backward(*run(index, x))
                grads.append(x.grad)
                hooks.new_batch()
        finally:
            hooks.remove()
        stats.shrink_fisher()
        with self.timer.stage("costs"):
            self.collect(modules, stats)
        return grads
