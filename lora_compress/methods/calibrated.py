"""The calibrated pass: statistics → per-layer ranks → factors, by the config's method, block by block.

    pass 1, when the method weights its outputs by F or a budget is allocated (calibrate/gradient_pass.py):
        Grams and gradient moments block by block; each layer's cost (or rule rank) taken while its block
        is loaded, its F kept for pass 2 (on disk when large)
    ranks: the budget allocated over all costs (methods/allocate.py), or the per-layer rule
    pass 2, block by block:
        closed loop (sequential): each group of layers fed the compressed model's own inputs
        open loop (whiten): each layer on the dense model's inputs
    then the targets outside the blocks (a pooler), from the head's forward

One code path in memory (calibrate/block_source.ResidentBlocks) and streamed from the shards
(stream/block_loader.BlockLoader). At any time it holds: the model (or, streamed, one block), one
block's calibration hidden states (every boundary's, spilled to disk when large, in pass 1), the
statistics of the layers being worked on, and what pass 1 leaves for pass 2 (a cost vector per
layer, and F, spilled when large). The layers of a group (q/k/v; gate/up) are factored on the
worker pool (core/workers.py). A model without repeated blocks is compressed whole.
"""
from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.block_source import BlockSource, ResidentBlocks, RunsBeforeBlocks
from ..calibrate.blocks import block_hidden, call_block, find_blocks
from ..calibrate.closed_loop import run_sequential, sequential_block
from ..calibrate.experts import fall_back_to_weights_
from ..calibrate.seq2seq import is_encoder_decoder
from ..calibrate.gradient_pass import gradient_pass
from ..calibrate.spill import SPILL_BYTES, Spill
from ..calibrate.statistics import FULL_FISHER_MAX, GramHooks, Statistics, collect_statistics, peak_memory_mb
from ..calibrate.timing import StageTimer
from ..calibrate.tokens import batches
from ..core import svd as svdmath
from ..core.layers import check_finite_float, dense_weight
from ..core.patch import factor_module_
from ..core.targets import find_targets
from ..core.whitening import needs_cholesky, shrunk_gram
from ..core.workers import layer_workers, ordered_map
from ..errors import LoraCompressError
from .allocate import LayerCost, allocate
from .config import CompressConfig
from .ranks import SENSITIVITY, check_fixed_rank, choose_ranks, layer_costs, rule_rank, rule_ranks
from .registry import LayerInputs
from .results import CompressionReport, new_layer_result


def check_calibration_length(model: nn.Module, tokens: torch.Tensor) -> None:
    """Refuse calibration sequences longer than the model's positions."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions and tokens.shape[1] > positions:
        raise LoraCompressError(f"--calib-len {tokens.shape[1]} is longer than the model's {positions} positions; "
                                f"pass --calib-len {positions} or less")


class Factorer:
    """Factors layers group by group by the config's method, and records what happened.

    ``ranks`` may lack layers (no pass 1): their rule rank is then taken from the Gram they are
    factored on. ``fisher`` holds the gradient covariances of the block at hand.
    """

    def __init__(self, model: nn.Module, config: CompressConfig, targets: dict[str, nn.Module],
                 ranks: dict[str, int | None], timer: StageTimer | None = None):
        self.model, self.config, self.targets, self.ranks = model, config, targets, ranks
        self.method, self.timer = config.record, timer or StageTimer()
        self.results = {name: new_layer_result(name, module) for name, module in targets.items()}
        self.fisher: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}  # the group at hand's output Grams
        self.diagonal: torch.Tensor | None = None  # and the diagonal of its input's Gram
        self.sparse: dict[str, int] = {}  # experts routed too few calibration tokens → tokens: factored from W

    def fall_back_(self, stats: Statistics, names) -> Statistics:
        """Experts among ``names`` routed fewer than ``expert_min_tokens`` get isotropic statistics
        (calibrate/experts.py) and are factored from their weights; returns ``stats``."""
        self.sparse.update(fall_back_to_weights_(stats, self.model, names, self.config.expert_min_tokens))
        return stats

    def __call__(self, name: str, gram: torch.Tensor, cross: torch.Tensor | None = None) -> None:
        self.group([name], gram, cross)

    def group(self, names: list[str], gram: torch.Tensor | None, cross: torch.Tensor | None,
              outputs: dict[str, torch.Tensor] | None = None, diagonal: torch.Tensor | None = None) -> None:
        """Factor ``names``, layers reading one input (Gram ``gram``, cross-Gram ``cross``; ``outputs``: the
        output Grams of those summed on their output side; ``diagonal``: diag of the input's Gram), and swap
        them in. An expert routed too few tokens is factored on isotropic statistics: the truncated SVD of W."""
        self.outputs, self.diagonal = outputs or {}, diagonal
        for name in [n for n in names if n in self.sparse]:
            self.results[name].note = (f"received {self.sparse[name]} calibration tokens (fewer than "
                                       f"--expert-min-tokens {self.config.expert_min_tokens}): factored from its "
                                       f"weight spectrum")
            self.fisher.pop(name, None)
            outputs, diagonal, self.outputs, self.diagonal = self.outputs, self.diagonal, {}, None
            self._group([name], torch.eye(dense_weight(self.targets[name]).shape[1], dtype=torch.float64), None)
            self.outputs, self.diagonal = outputs, diagonal
        self._group([n for n in names if n not in self.sparse], gram, cross)

    def _group(self, names: list[str], gram: torch.Tensor, cross: torch.Tensor | None) -> None:
        if not names:
            return
        with self.timer.stage("factoring"):
            for name in names:
                if name not in self.ranks:
                    self.ranks[name] = rule_rank(self.config, dense_weight(self.targets[name]), gram,
                                                 self.outputs.get(name), self.diagonal)
            todo = [name for name in names if self._factored(name)]
            shapes = [tuple(dense_weight(self.targets[name]).shape) for name in todo]
            refit = self.method.dense_stream
            on_input = [s for name, s in zip(todo, shapes) if name not in self.outputs]
            shrunk = shrunk_gram(gram, self.config.options.gram_shrinkage) if gram is not None else None
            cholesky = svdmath.cholesky_factor(shrunk)[0] if any(needs_cholesky(s, refit) for s in on_input) else None
            inputs = LayerInputs(gram, cholesky, cross if refit else None)
            workers = min(len(todo), layer_workers(self.config.workers, shapes, self.config.device)) or 1
            with closing(ordered_map(lambda name: self._factors(name, inputs), todo, workers)) as found:
                for name, factors in zip(todo, found):
                    factor_module_(self.model, name, factors)
                    self.results[name].rank, self.results[name].energy_kept = factors.rank, factors.energy_kept

    def _factored(self, name: str) -> bool:
        """Whether ``name`` gets factors; else its result says why it stays dense."""
        if self.ranks[name] is not None:
            return True
        self.results[name].note = ("left dense by the budget" if self.config.budget
                                   else "its rank would save no parameters or pass --max-keep; left dense")
        return False

    def _factors(self, name: str, inputs: LayerInputs) -> svdmath.Factors:
        weight = dense_weight(self.targets[name])
        check_finite_float(name, weight)
        fisher = self.fisher.get(name) if self.method.gradients else None
        layer = LayerInputs(inputs.gram, inputs.cholesky, inputs.cross, fisher, self.outputs.get(name), self.diagonal)
        return self.method.factor(weight, min(self.ranks[name], min(weight.shape)), layer, self.config.options,
                                  svd=self.config.svd, seed=self.config.seed)

    def report(self, tokens: torch.Tensor, start: float) -> CompressionReport:
        """The CompressionReport of every target, with the calibration settings, costs and time split."""
        config = self.config
        report = CompressionReport(config, [self.results[n] for n in self.targets])
        report.calibration = {"samples": int(tokens.shape[0]), "length": int(tokens.shape[1]),
                              "tokens": int(tokens.numel()), "text": config.calib,
                              "generated": 0,  # sequences the model wrote itself (methods/compress.py sets it)
                              "sensitivity": SENSITIVITY if config.budget is not None else None,
                              "peak_memory_mb": round(peak_memory_mb(), 1),
                              "seconds": round(time.perf_counter() - start, 1),
                              "seconds_by_stage": self.timer.rounded()}
        if self.sparse:  # experts factored from their weights: too few tokens routed to them
            report.calibration["sparse_experts"] = {"min_tokens": config.expert_min_tokens,
                                                    "tokens": dict(sorted(self.sparse.items()))}
        return report


class RankCollector:
    """What pass 2 needs from pass 1, gathered a block at a time: each layer's cost (or rule rank), and
    its gradient covariance F, parked in ``spill`` under the block's first target."""

    def __init__(self, config: CompressConfig, spill: Spill, fall_back: Callable[[Statistics, dict], Statistics]):
        self.config, self.spill, self.fall_back = config, spill, fall_back
        self.costs: dict[str, LayerCost] = {}
        self.ranks: dict[str, int | None] = {}

    def add(self, modules: dict[str, nn.Module], stats: Statistics) -> None:
        """Take one block's statistics (its weights still loaded); its Grams are dropped with it. Experts
        routed too few tokens get isotropic statistics first (``fall_back``: Factorer.fall_back_)."""
        if not modules:
            return
        self.fall_back(stats, modules)
        self.spill.put(self._key(modules), dict(stats.fisher))
        if self.config.budget is not None:
            workers = layer_workers(self.config.workers, [tuple(dense_weight(m).shape) for m in modules.values()],
                                    self.config.device)
            self.costs.update(layer_costs(modules, stats, workers, self.config.options.gram_shrinkage))
        else:
            self.ranks.update(rule_ranks(self.config, modules, stats))  # rule_ranks shrinks as the method does

    def fisher_of(self, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """The gradient covariances pass 1 left for ``modules`` (one block's targets), taken once."""
        if not modules or not self.config.needs_gradients:
            return {}
        return self.spill.take(self._key(modules))

    def ranks_for(self, targets: dict[str, nn.Module]) -> dict[str, int | None]:
        """Every target's rank known so far: the budget allocated in model order, or the rule ranks."""
        if self.config.budget is not None and self.costs:
            return allocate({n: self.costs[n] for n in targets}, self.config.budget, self.config.allocation_max_keep)
        return dict(self.ranks)

    @staticmethod
    def _key(modules: dict[str, nn.Module]) -> str:
        return f"fisher-{next(iter(modules))}"


OnBlock = Callable[[int], None]  # called after block i is compressed (streamed: its tensors are written)


def compress_blocks(source: BlockSource, config: CompressConfig, tokens: torch.Tensor, targets: dict[str, nn.Module],
                    progress: bool = True, on_block: OnBlock | None = None,
                    spill_folder: Path | None = None) -> CompressionReport:
    """Factor ``targets`` of ``source``'s model by a calibrated method, block by block (module docstring).

    Args:
        source: the model's blocks, in memory or read from the shards.
        config: a calibrated method and its rank option.
        tokens: calibration token ids, (samples, length).
        targets: the layers to factor, by name.
        on_block: called with each block's index once it is compressed.
        spill_folder: where what pass 1 leaves for pass 2 goes when it is large (a temporary folder if None).

    Returns:
        The CompressionReport, with ``calibration`` (settings, sensitivity, peak memory, seconds, time split).

    Raises:
        RunsBeforeBlocks: a target runs before the first block.
    """
    start, timer = time.perf_counter(), StageTimer()
    check_calibration_length(source.model, tokens)
    with timer.stage("forward"):
        calls = source.inputs(tokens, source.outside(targets))
    spill = Spill(_too_large_to_keep(source, calls, tokens, targets), spill_folder)
    wanted = {p: p.requires_grad for p in source.model.parameters()}
    source.model.requires_grad_(False)  # the backward needs activation gradients only, not weight gradients
    try:
        factorer = Factorer(source.model, config, targets, {}, timer)
        collector = RankCollector(config, spill, factorer.fall_back_)
        if config.needs_gradients:
            gradient_pass(source, calls, tokens, targets, collector.add, spill, timer, progress,
                          output_side=not config.record.dense_stream)
        factorer.ranks.update(collector.ranks_for(targets))
        compress_pass = _closed_loop_pass if config.record.closed_loop else _open_loop_pass
        last = compress_pass(source, calls, factorer, collector, on_block, progress)
        _outside_pass(source, tokens, last, factorer, collector)
    finally:
        spill.close()
        for param, flag in wanted.items():
            param.requires_grad_(flag)
    return factorer.report(tokens, start)


def _too_large_to_keep(source: BlockSource, calls: list, tokens: torch.Tensor, targets: dict[str, nn.Module]) -> bool:
    """Whether pass 1's hidden states at every block boundary, or the gradient covariances it leaves for
    pass 2 (float32, out² for layers up to FULL_FISHER_MAX outputs), exceed SPILL_BYTES."""
    width = block_hidden(calls[0])[0].shape[-1]
    hidden = (len(source.blocks) + 1) * tokens.numel() * width * torch.finfo(source.dtype).bits // 8
    outputs = [dense_weight(module).shape[0] for module in targets.values()]
    fisher = sum(4 * out * out if out <= FULL_FISHER_MAX else 8 * out for out in outputs)
    return max(hidden, fisher) > SPILL_BYTES


def _closed_loop_pass(source: BlockSource, calls: list, factorer: Factorer, collector: RankCollector,
                      on_block: OnBlock | None, progress: bool) -> list[torch.Tensor]:
    """Pass 2 of closed-loop methods; returns the compressed stream's last hidden states."""
    compressed = block_hidden(calls[0])
    dense = compressed if factorer.method.dense_stream else None  # the dense stream serves only the refit
    for index in tqdm(range(len(source.blocks)), desc="compressing blocks", unit="block", disable=not progress):
        members = source.members(factorer.targets, index)
        with source.loaded(index) as block:
            factorer.fisher = collector.fisher_of(members)
            with factorer.timer.stage("forward"):
                dense, compressed = sequential_block(source.blocks[index][0], block, factorer.targets,
                                                     calls[index], dense, compressed, factorer.group,
                                                     output_side=not factorer.method.dense_stream)
            _finish_block(factorer, index, on_block)
    return compressed


def _open_loop_pass(source: BlockSource, calls: list, factorer: Factorer, collector: RankCollector,
                    on_block: OnBlock | None, progress: bool) -> list[torch.Tensor]:
    """Pass 2 of open-loop methods (whiten): dense Grams per block, then factor; returns the dense last
    hidden states."""
    hidden = block_hidden(calls[0])
    for index in tqdm(range(len(source.blocks)), desc="compressing blocks", unit="block", disable=not progress):
        members = source.members(factorer.targets, index)
        with source.loaded(index) as block:
            factorer.fisher = collector.fisher_of(members)
            with factorer.timer.stage("forward"):
                stats, hidden = _grams(members, hidden, lambda i, h, c=calls[index]: call_block(block, c[i], h),
                                       factorer.timer, not factorer.method.dense_stream)
            _factor_groups(factorer, members, stats)
            _finish_block(factorer, index, on_block)
    return hidden


def _finish_block(factorer: Factorer, index: int, on_block: OnBlock | None) -> None:
    factorer.fisher = {}
    if on_block is not None:
        with factorer.timer.stage("writing"):
            on_block(index)


def _outside_pass(source: BlockSource, tokens: torch.Tensor, last: list[torch.Tensor], factorer: Factorer,
                  collector: RankCollector) -> None:
    """The targets outside the blocks, on the inputs the head's forward gives them."""
    outside = source.outside(factorer.targets)
    if not outside:
        return
    ids = batches(tokens)
    factorer.fisher = collector.fisher_of(outside)
    with factorer.timer.stage("forward"):
        stats, _ = _grams(outside, last, lambda i, h: source.head(ids[i], h), factorer.timer,
                          not factorer.method.dense_stream)
    _factor_groups(factorer, outside, stats)


def _factor_groups(factorer: Factorer, modules: dict[str, nn.Module], stats: Statistics) -> None:
    """Factor ``modules`` on their Grams (input Gram, or output Gram on the output side), layers sharing
    an input together (experts routed too few tokens on isotropic statistics)."""
    factorer.fall_back_(stats, modules)
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(stats.owner[name], []).append(name)
    for owner, names in groups.items():
        factorer.group(names, stats.grams.get(owner), None, {n: stats.outputs[n] for n in names if n in stats.outputs},
                       stats.diagonals.get(owner))


@torch.no_grad()
def _grams(modules: dict[str, nn.Module], inputs: list[torch.Tensor], run, timer: StageTimer,
           output_side: bool = True) -> tuple[Statistics, list]:
    """Input (or output-side) Grams of ``modules`` over ``run(i, h)`` for each input h; and the outputs of ``run``."""
    stats = Statistics()
    hooks = GramHooks(stats, modules, timer=timer, output_side=output_side)
    outputs = []
    try:
        for index, hidden in enumerate(inputs):
            outputs.append(run(index, hidden))
            hooks.new_batch()
    finally:
        hooks.remove()
    return stats, outputs


def compress_calibrated_(model: nn.Module, config: CompressConfig, tokens: torch.Tensor,
                         progress: bool = True, spill_folder: Path | None = None) -> CompressionReport:
    """Factor the targeted layers of ``model`` in place by an activation-aware method.

    Block by block (:func:`compress_blocks`) for models with repeated blocks; each block is cast to the
    compute dtype while it is worked on, so a bfloat16 model stays bfloat16 in memory.

    Args:
        model: a transformers model (causal LM or encoder).
        config: rank option (``budget`` allocates ranks per layer) and ``method``.
        tokens: calibration token ids, (samples, length).

    Returns:
        The CompressionReport, with ``calibration`` (settings, sensitivity, peak memory, seconds).
    """
    targets = find_targets(model, config.include, config.exclude)
    check_fixed_rank(targets, config.rank)
    if find_blocks(model) and not is_encoder_decoder(model):  # an encoder-decoder's two stacks: compressed whole
        try:
            return compress_blocks(ResidentBlocks(model, config.device), config, tokens, targets, progress,
                                   spill_folder=spill_folder)
        except RunsBeforeBlocks:
            pass  # a target before the blocks: compress the model whole
    return _compress_whole_(model, config, tokens, targets, progress)


def _compress_whole_(model: nn.Module, config: CompressConfig, tokens: torch.Tensor, targets: dict[str, nn.Module],
                     progress: bool) -> CompressionReport:
    """The calibrated pass over the whole model at once (models without repeated blocks, or with a target
    before them): every Gram at once, so memory grows with the model; the blocks, if any, still run in a
    closed loop."""
    start, method = time.perf_counter(), config.record
    check_calibration_length(model, tokens)
    stats = collect_statistics(model, tokens, targets, fisher=config.needs_gradients, progress=progress)
    factorer = Factorer(model, config, targets, {})
    factorer.ranks.update(choose_ranks(config, targets, factorer.fall_back_(stats, targets)))
    factorer.fisher = stats.fisher
    if method.closed_loop:
        stats.grams.clear()  # only the Fisher moments are used from here on
        rest = run_sequential(model, tokens, targets, factorer.group, progress, dense_stream=method.dense_stream)
        if rest:
            _factor_groups(factorer, rest, collect_statistics(model, tokens, rest, fisher=False, progress=False))
    else:
        _factor_groups(factorer, targets, stats)
    return factorer.report(tokens, start)
