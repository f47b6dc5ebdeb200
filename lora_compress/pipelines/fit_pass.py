"""The fit pass: block by block, each group of layers gathers its statistics, is factored and swapped in.

    closed loop   each group (q/k/v; o; gate/up; down) sees the inputs the already compressed groups
                  produce: a forward over the calibration batches per group, cut short where the group's
                  statistics are complete (before it runs, when they read its input alone), then the
                  group is factored; the block's compressed outputs feed the next block
    open loop     one forward per block on the dense model's inputs, then every group is factored

Two streams run through the blocks with a dense-stream statistic (the refit): the dense model's and the
compressed model's. An encoder-decoder's decoder reads the compressed encoder's output. The targets
outside the blocks (a pooler) come last, on the inputs the model's exit gives them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.block_source import BlockSource
from ..calibrate.blocks import Stop, block_hidden, call_block
from ..calibrate.collectors import Collector, LayerStatistics, StatisticsHooks, collectors_for
from ..calibrate.experts import sparse_experts
from ..calibrate.timing import StageTimer
from ..calibrate.tokens import batches
from .factoring import GroupFactoring
from .passes import PassPlan

Kept = Callable[[str], dict[str, dict[str, torch.Tensor]]]  # first target of a block → its layers' kept statistics


class FitPass:
    """Pass 2 over ``source`` (module docstring). ``kept(key)`` gives what the gradient pass left for the
    block whose first target is ``key``, ``groups`` the groups it saw there; ``on_block(i)`` runs once
    block i is compressed (streamed: its tensors are written)."""

    def __init__(self, source: BlockSource, tokens: torch.Tensor, targets: dict[str, nn.Module], plan: PassPlan,
                 factoring: GroupFactoring, kept: Kept, groups: dict[str, list[list[str]]], timer: StageTimer,
                 progress: bool = True, on_block: Callable[[int], None] | None = None, sparse_known: bool = False):
        self.source, self.tokens, self.targets, self.plan = source, tokens, targets, plan
        self.factoring, self.kept, self.groups, self.timer = factoring, kept, groups, timer
        self.progress, self.on_block, self.sparse_known = progress, on_block, sparse_known
        self.ids = batches(tokens)
        self._kept: tuple[str | None, dict] = (None, {})  # the block at hand's kept statistics, taken once

    @torch.no_grad()
    def run(self, first_calls: list) -> None:
        upstream, last = None, len(self.source.stacks) - 1
        for stack in range(len(self.source.stacks)):
            calls = first_calls if stack == 0 else self.source.calls(self.tokens, stack, upstream)
            compressed = block_hidden(calls[0])
            dense = compressed if self.plan.dense_stream else None  # the dense stream serves only the refit
            indices = self.source.stack_blocks(stack)
            for k, index in enumerate(tqdm(indices, desc="compressing blocks", unit="block",
                                           disable=not self.progress)):
                members = self.source.members(self.targets, index)
                with self.source.loaded(index) as block:
                    with self.timer.stage("forward"):
                        if self.plan.closed_loop:
                            dense, compressed = self._closed(block, members, calls[k], dense, compressed)
                        else:
                            compressed = self._open(block, members, calls[k], compressed)
                    if self.on_block is not None:  # while the block is loaded: streamed, its tensors are written
                        with self.timer.stage("writing"):
                            self.on_block(index)
            if stack < last:
                upstream = [self.source.exit(stack, self.ids[i], h, i) for i, h in enumerate(compressed)]
        self._outside(compressed, upstream, dense)

    def _closed(self, block, members, calls, dense, compressed):
        """One block of the closed loop; returns its (dense, compressed) outputs, one per batch."""
        groups, dense_inputs, dense_next = None, None, None
        if dense is not None:
            groups, dense_inputs, dense_next = _dense_inputs(block, members, calls, dense)
        for group in groups if groups is not None else self._groups(block, members, calls, compressed):
            self._weight_only(group)
            todo = self.factoring.to_factor(group)
            if not todo:  # the whole group stays dense: no statistics, no forward
                continue
            modules = {name: members[name] for name in todo}
            read_dense = None if dense_inputs is None else (lambda _name, batch, g=group: dense_inputs[g[0]][batch])
            hooks = StatisticsHooks(modules, collectors_for(modules, self.plan.fit_pass), self.timer, read_dense,
                                    stop=True)
            try:
                for call, hidden in zip(calls, compressed):
                    try:
                        call_block(block, call, hidden)
                    except Stop:
                        pass
                    hooks.new_batch()
            finally:
                hooks.remove()
            self._factor(next(iter(members)), todo, hooks.statistics(self.tokens.numel()))
        return dense_next, [call_block(block, call, hidden) for call, hidden in zip(calls, compressed)]

    def _groups(self, block, members, calls, hidden) -> list[list[str]]:
        """The block's groups, as the gradient pass saw them, else from its first batch."""
        if not members:
            return []
        known = self.groups.get(next(iter(members)))
        if known is not None:
            return known
        hooks = StatisticsHooks(members, {})
        try:
            call_block(block, calls[0], hidden[0])
        finally:
            hooks.remove()
        return hooks.groups()

    def _open(self, block, members, calls, hidden):
        """One block of the open loop: statistics on the dense inputs, every group factored; its dense outputs."""
        if members:
            self._weight_only(list(members))
        members = {name: members[name] for name in self.factoring.to_factor(list(members))}
        hooks = StatisticsHooks(members, collectors_for(members, self.plan.fit_pass), self.timer)
        outputs = []
        try:
            for call, h in zip(calls, hidden):
                outputs.append(call_block(block, call, h))
                hooks.new_batch()
        finally:
            hooks.remove()
        if members:
            stats = hooks.statistics(self.tokens.numel())
            for group in hooks.groups():
                self._factor(next(iter(members)), group, stats)
        return outputs

    def _outside(self, hidden, upstream, dense) -> None:
        """The targets outside the blocks, on the inputs the model's exit gives them (and, for a dense-stream
        statistic, the inputs it gives them on the dense stream)."""
        outside = self.source.outside(self.targets)
        if outside:
            self._weight_only(list(outside))
        outside = {name: outside[name] for name in self.factoring.to_factor(list(outside))}
        if not outside:
            return
        last = len(self.source.stacks) - 1

        def exits(collectors, stream, read_dense=None):
            hooks = StatisticsHooks(outside, collectors, self.timer, read_dense)
            try:
                with self.timer.stage("forward"):
                    for i, h in enumerate(stream):
                        self.source.exit(last, self.ids[i], h, i, None if upstream is None else upstream[i])
                        hooks.new_batch()
            finally:
                hooks.remove()
            return hooks

        read_dense = None
        if dense is not None:
            seen = exits({name: (_Inputs(),) for name in outside}, dense)
            read_dense = lambda name, batch: seen.sums[seen.owner[(name, _Inputs.key)]][_Inputs.key][batch]
        hooks = exits(collectors_for(outside, self.plan.fit_pass), hidden, read_dense)
        stats = hooks.statistics(self.tokens.numel())
        for group in hooks.groups():
            self._factor(next(iter(outside)), group, stats)

    def _weight_only(self, names: list[str]) -> None:
        """Factor the experts of ``names`` routed too few tokens (known from the gradient pass) from their weights."""
        sparse = [name for name in names if name in self.factoring.sparse]
        if sparse:
            self.factoring.factor(sparse, {})

    def _factor(self, key: str, group: list[str], stats: dict[str, LayerStatistics]) -> None:
        """Factor ``group`` on ``stats`` with what the gradient pass kept for its block (``key``)."""
        if self._kept[0] != key:
            self._kept = (key, self.kept(key))
        kept = self._kept[1]
        found = {name: stats[name].with_values(kept.get(name, {})) for name in group}
        if not self.sparse_known:
            self.factoring.sparse.update(sparse_experts(self.source.model, found, group,
                                                        self.factoring.config.expert_min_tokens))
        self.factoring.factor(group, found)


@dataclass(frozen=True)
class _Inputs(Collector):
    """The inputs themselves, per batch (the dense stream's, which the refit's cross-Gram reads)."""

    key: ClassVar[str] = "inputs"
    per_input: ClassVar[bool] = True

    def nbytes(self, shape):
        return 0  # held by the dense stream's record, not summed

    def add(self, sums, call):
        sums.setdefault(self.key, []).append(call.raw_inputs.detach())


@torch.no_grad()
def _dense_inputs(block, members: dict[str, nn.Module], calls, hidden):
    """Run the dense block, keeping each group's input per batch; returns (groups, inputs, block outputs)."""
    hooks = StatisticsHooks(members, {name: (_Inputs(),) for name in members})
    outputs = []
    try:
        for call, h in zip(calls, hidden):
            outputs.append(call_block(block, call, h))
            hooks.new_batch()
    finally:
        hooks.remove()
    groups = hooks.groups()
    return groups, {group[0]: hooks.sums[group[0]]["inputs"] for group in groups}, outputs
