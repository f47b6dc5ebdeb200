"""The gradient pass: every layer's statistics over the dense model, forward and backward, a block at a time.

    h_0 ─▶ block 0 ─▶ h_1 ─▶ … ─▶ h_N ─▶ exit ─▶ loss     forward, keeping every h_i (spilled when large)
    g_0 ◀─ block 0 ◀─ g_1 ◀─ … ◀─ g_N ◀──┘                 backward from the last block: each block's
                                                         forward recomputed with grad (activation
                                                         checkpointing at block boundaries)

An encoder-decoder runs its two stacks in turn: the decoder's calls read the encoder's output, and the
gradient each decoder block sends into it flows back through the encoder's exit into its blocks.
Hooks gather a block's statistics during its recomputed forward and its backward; they go to
``collect(modules, stats, groups)`` while the block is still loaded and are dropped after, so the pass
holds one block's statistics at a time. The unavoidable work is one forward and one backward over the
calibration tokens; the recomputation adds a forward, the price of keeping only the block boundaries.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.block_source import BlockSource
from ..calibrate.blocks import block_hidden, call_block
from ..calibrate.collectors import Collector, LayerStatistics, StatisticsHooks, collectors_for
from ..calibrate.loss import calibration_loss
from ..calibrate.spill import Spill
from ..calibrate.timing import StageTimer
from ..calibrate.tokens import batches

Collect = Callable[[dict[str, nn.Module], dict[str, LayerStatistics], list[list[str]]], None]


class GradientPass:
    """Pass 1 over ``source`` (module docstring): ``collect`` receives each block's targets, their
    statistics (``declared``) and their groups, and the targets outside the blocks' after the loss."""

    def __init__(self, source: BlockSource, tokens: torch.Tensor, targets: dict[str, nn.Module],
                 declared: tuple[Collector, ...], collect: Collect, spill: Spill, timer: StageTimer,
                 seed: int = 0, progress: bool = True):
        self.source, self.tokens, self.targets, self.declared = source, tokens, targets, declared
        self.collect, self.spill, self.timer, self.progress = collect, spill, timer, progress
        self.ids = batches(tokens)
        last = len(source.stacks) - 1
        self.upstream: list[list[torch.Tensor] | None] = [None] * len(source.stacks)  # what each stack reads
        self.loss = calibration_loss(source.model, self.ids, lambda batch, hidden, features: source.exit(
            last, self.ids[batch], hidden, batch, self._read(last, batch), features), seed)

    def run(self, first_calls: list) -> None:
        """Forward through every stack, then backward; ``first_calls``: the first stack's block calls."""
        calls, hidden = self._forward(first_calls)
        with self.timer.stage("backward"):
            grads = self._stage(self.source.outside(self.targets), hidden,
                                lambda i, x: (self.loss(i, x), None))
            for stack in reversed(range(len(self.source.stacks))):
                if stack < len(self.source.stacks) - 1:  # through the encoder's exit, from what the decoder sent
                    inputs, sent = self.spill.take_list(f"exit-{stack}"), grads_into
                    grads = self._stage({}, inputs, lambda i, x, s=stack, g=sent: (
                        self.source.exit(s, self.ids[i], x, i), g[i]))
                grads, grads_into = self._backward_stack(stack, calls[stack], grads)

    def _forward(self, first_calls: list):
        calls, hidden = [], None
        with self.timer.stage("forward"):
            for stack in range(len(self.source.stacks)):
                stack_calls = first_calls if stack == 0 else \
                    self.source.calls(self.tokens, stack, self.upstream[stack])
                calls.append(stack_calls)
                hidden = block_hidden(stack_calls[0])  # the stack's first inputs, one (B, T, C) tensor per batch
                for k, index in enumerate(tqdm(self.source.stack_blocks(stack), desc="calibrating: forward",
                                               unit="block", disable=not self.progress)):
                    self.spill.put_list(f"hidden-{index}", hidden)
                    with self.source.loaded(index) as block:
                        hidden = [_forward(block, call, h) for call, h in zip(stack_calls[k], hidden)]
                if stack < len(self.source.stacks) - 1:
                    self.spill.put_list(f"exit-{stack}", hidden)
                    with torch.no_grad():
                        self.upstream[stack + 1] = [self.source.exit(stack, self.ids[i], h, i).detach()
                                                    for i, h in enumerate(hidden)]
        return calls, hidden

    def _backward_stack(self, stack: int, calls: list, grads: list):
        """Backward through the blocks of ``stack``; returns the gradients at its first inputs and those it sent
        into what it reads from the stack before (None for the first stack)."""
        upstream = self.upstream[stack]
        sent = None if upstream is None else [torch.zeros_like(u) for u in upstream]
        indices = list(self.source.stack_blocks(stack))
        for k in tqdm(reversed(range(len(indices))), total=len(indices), desc="calibrating: backward",
                      unit="block", disable=not self.progress):
            index = indices[k]
            inputs = self.spill.take_list(f"hidden-{index}")
            with self.source.loaded(index) as block:
                grads = self._stage(self.source.members(self.targets, index), inputs,
                                    lambda i, x, g=grads, c=calls[k]: self._block_call(block, c[i], x, g[i],
                                                                                       self._read(stack, i), sent, i))
        return grads, sent

    @staticmethod
    def _block_call(block, call, x, grad, upstream, sent, batch):
        """(output, its gradient) of ``block`` on ``x``; a decoder block's read of the encoder's output
        (``upstream``) becomes a leaf whose gradient is added to ``sent[batch]`` once the backward ran."""
        if upstream is None:
            return call_block(block, call, x), grad
        leaf = upstream.detach().requires_grad_(True)
        output = call_block(block, _replaced(call, upstream, leaf), x)
        return output, grad, (lambda: sent[batch].add_(leaf.grad) if leaf.grad is not None else None)

    def _read(self, stack: int, batch: int):
        upstream = self.upstream[stack]
        return None if upstream is None else upstream[batch]

    def _stage(self, modules: dict[str, nn.Module], inputs: list[torch.Tensor], run) -> list[torch.Tensor]:
        """The gradient at each input x of a stretch of the model (``run(i, x)`` → (output, its gradient or None
        for a loss[, a function to call after the backward])), with hooks gathering its statistics."""
        hooks = StatisticsHooks(modules, collectors_for(modules, self.declared), timer=self.timer)
        grads = []
        try:
            for index, hidden in enumerate(inputs):
                x = hidden.detach().requires_grad_(True)
                with torch.enable_grad():
                    output, grad, *after = run(index, x)
                    torch.autograd.backward(output, grad)
                for done in after:
                    done()
                grads.append(x.grad)
                hooks.new_batch()
        finally:
            hooks.remove()
        if modules:
            with self.timer.stage("costs"):
                self.collect(modules, hooks.statistics(self.tokens.numel()), hooks.groups())
        return grads


def _forward(block: nn.Module, call: tuple, hidden: torch.Tensor) -> torch.Tensor:
    """The block's output, computed with grad as the recomputed forward of the backward computes it."""
    with torch.enable_grad():
        return call_block(block, call, hidden.detach().requires_grad_(True)).detach()


def _replaced(call: tuple[tuple, dict], old: torch.Tensor, new: torch.Tensor) -> tuple[tuple, dict]:
    """``call`` with every argument that is the tensor ``old`` replaced by ``new``."""
    args, kwargs = call
    if not any(a is old for a in (*args, *kwargs.values())):
        raise RuntimeError("a decoder block's call does not read the encoder's output it was captured with")
    return (tuple(new if a is old else a for a in args), {k: new if v is old else v for k, v in kwargs.items()})
