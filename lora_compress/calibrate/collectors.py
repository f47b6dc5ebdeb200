"""Calibration statistics as collectors: each owns its hooks' arithmetic, its sums and its size.

A method declares the collectors it needs (methods/registry.py); the calibrated pipeline runs the
passes that gather them, one block at a time, and the memory plan sums the same declarations, so
the estimate cannot drift from what runs. Adding a statistic is one Collector subclass, wherever the
method that needs it lives.

    InputGram            C = Σ_t x_t x_tᵀ         (in×in, float64)   layers fitted on their inputs
    OutputGram           Σ_t (W·x_t)(W·x_t)ᵀ      (out×out)          = W·C·Wᵀ, for layers with out ≤ in
    InputDiagonal        diag(C) = Σ_t x_t²       (in,)              to shrink C towards its diagonal
    GradientCovariance   F = Σ_t g_t g_tᵀ         (out×out, float32) g = ∂loss/∂y_t; Σ_t g_t² past a width
    CrossGram            X_dᵀ X_c                 (in×in)            the dense inputs beside the compressed

Sums are over the calibration tokens, never stored activations. A collector marked ``per_input``
sums once for the layers reading one tensor (q/k/v, gate/up): they share its value.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.layers import dense_weight
from .blocks import Stop
from .forward import forward
from .timing import StageTimer
from .tokens import batches

FULL_FISHER_MAX = 2048  # widest layer output whose full gradient covariance is kept (out² floats); else its diagonal


def flat_features(x: torch.Tensor) -> torch.Tensor:
    """(…, features) → (tokens, features), float32."""
    return x.reshape(-1, x.shape[-1]).float()  # (tokens, features)


def accumulate(sums: dict, key: str, value: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
    """sums[key] += value, in ``dtype`` (float64 by default: sums over many tokens)."""
    sums[key] = sums[key] + value.to(dtype) if key in sums else value.to(dtype)


class LayerCall:
    """What a forward hook sees of one call of one layer, its float32 views made once and shared."""

    def __init__(self, module: nn.Module, inputs: torch.Tensor, output: torch.Tensor,
                 dense_inputs: torch.Tensor | None = None):
        self.module, self.raw_inputs, self.raw_output, self.raw_dense = module, inputs, output, dense_inputs

    @cached_property
    def inputs(self) -> torch.Tensor:
        """x, (tokens, in) float32."""
        return flat_features(self.raw_inputs.detach())

    @cached_property
    def outputs(self) -> torch.Tensor:
        """W·x of y = W·x + b, (tokens, out) float32."""
        flat = flat_features(self.raw_output.detach())
        bias = getattr(self.module, "bias", None)
        return flat if bias is None else flat - bias.detach().float()

    @cached_property
    def dense_inputs(self) -> torch.Tensor:
        """The dense model's input to this layer for the same batch, (tokens, in) float32."""
        if self.raw_dense is None:
            raise RuntimeError("a dense-stream collector ran without the dense stream")
        return flat_features(self.raw_dense)

    @property
    def tokens(self) -> int:
        return self.inputs.shape[0]


@dataclass(frozen=True)
class Collector:
    """One statistic of a layer, summed over calibration batches. Subclasses set ``key`` and say what a
    call (or, with ``gradient``, an output gradient) adds to ``sums`` and how many bytes the sums hold."""

    key: ClassVar[str]
    per_input: ClassVar[bool] = False  # one sum for the layers reading one tensor
    gradient: ClassVar[bool] = False  # summed from the gradient at the layer's output (a backward pass)
    dense_stream: ClassVar[bool] = False  # reads the dense model's inputs beside the compressed stream's
    reads_output: ClassVar[bool] = False  # reads the layer's output (else its input alone suffices)

    def applies(self, shape: tuple[int, int]) -> bool:
        """Whether a layer of ``shape`` (out, in) gets this statistic."""
        return True

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Bytes of the sums for one layer of ``shape`` (out, in)."""
        raise NotImplementedError

    def finish_bytes(self, shape: tuple[int, int]) -> int:
        """Bytes :meth:`finish` takes on top of the sums, for a moment (0: none)."""
        return 0

    def add(self, sums: dict, call: LayerCall) -> None:
        """Add one forward call (forward collectors)."""
        raise NotImplementedError

    def add_gradient(self, sums: dict, gradient: torch.Tensor) -> None:
        """Add the gradient at the layer's output for one batch (gradient collectors)."""
        raise NotImplementedError

    def finish(self, sums: dict, tokens: int) -> dict[str, torch.Tensor]:
        """The statistic once every token is in: ``{key: value}`` (default: the sum itself)."""
        return {self.key: sums[self.key]} if self.key in sums else {}


@dataclass(frozen=True)
class InputGram(Collector):
    """C = Σ x xᵀ of the layer's inputs, for the layers fitted on their input side (out > in), or for every
    layer with ``every_layer``."""

    key: ClassVar[str] = "gram"
    per_input: ClassVar[bool] = True
    every_layer: bool = False

    def applies(self, shape):
        return self.every_layer or shape[0] > shape[1]

    def nbytes(self, shape):
        return 8 * shape[1] * shape[1]

    def add(self, sums, call):
        accumulate(sums, self.key, call.inputs.T @ call.inputs)


@dataclass(frozen=True)
class OutputGram(Collector):
    """Σ (W·x)(W·x)ᵀ = W·C·Wᵀ for a layer with out ≤ in: all the output route of the whitening needs
    (core/whitening.py), and much smaller for a wide layer (a down_proj with in = 8,960 sums 1,536² floats
    instead of 8,960², 34× fewer multiply-adds)."""

    key: ClassVar[str] = "output_gram"
    reads_output: ClassVar[bool] = True

    def applies(self, shape):
        return shape[0] <= shape[1]

    def nbytes(self, shape):
        return 8 * shape[0] * shape[0]

    def add(self, sums, call):
        accumulate(sums, self.key, call.outputs.T @ call.outputs)


@dataclass(frozen=True)
class InputDiagonal(Collector):
    """diag(C) = Σ x² of the layer's inputs (in,), float64 from the exact squares."""

    key: ClassVar[str] = "input_diagonal"
    per_input: ClassVar[bool] = True

    def nbytes(self, shape):
        return 8 * shape[1]

    def add(self, sums, call):
        accumulate(sums, self.key, call.inputs.double().pow(2).sum(0))


@dataclass(frozen=True)
class CrossGram(Collector):
    """X_dᵀ X_c: the dense model's inputs against the compressed model's, (in, in) (closed loop only)."""

    key: ClassVar[str] = "cross"
    per_input: ClassVar[bool] = True
    dense_stream: ClassVar[bool] = True

    def nbytes(self, shape):
        return 8 * shape[1] * shape[1]

    def add(self, sums, call):
        accumulate(sums, self.key, call.dense_inputs.T @ call.inputs)


@dataclass(frozen=True)
class GradientCovariance(Collector):
    """F = Σ g gᵀ of the loss gradient at the layer's outputs (float32, out²) for layers with up to
    ``full_max`` outputs, shrunk towards its diagonal by the Ledoit–Wolf intensity once every token is in
    (with few calibration tokens for a wide layer the raw covariance is mostly noise: SmolLM2 with 8×256
    tokens, 40% cut, 123.6 alice29 perplexity unshrunk against 105.2 with the diagonal alone; 95.9
    shrunk); Σ g² (out,) for wider layers."""

    key: ClassVar[str] = "fisher"
    gradient: ClassVar[bool] = True
    full_max: int = FULL_FISHER_MAX

    def nbytes(self, shape):
        out = shape[0]
        return 4 * out * out if out <= self.full_max else 8 * out

    def finish_bytes(self, shape):
        return 12 * shape[0] * shape[0] if shape[0] <= self.full_max else 0  # the float64 mean and the shrunk copy

    def add_gradient(self, sums, gradient):
        flat = flat_features(gradient)  # (tokens, out)
        if flat.shape[1] > self.full_max:
            accumulate(sums, self.key, flat.pow(2).sum(0))
            return
        accumulate(sums, self.key, flat.T @ flat, torch.float32)
        squares = flat.double().pow(2)  # (tokens, out)
        accumulate(sums, "fourth", torch.stack([squares.sum(1).pow(2).sum(), squares.pow(2).sum()]))

    def finish(self, sums, tokens):
        if self.key not in sums:
            return {}
        fisher = sums[self.key]
        if "fourth" in sums:
            fisher = shrunk_covariance(fisher, sums["fourth"], tokens)
        return {self.key: fisher}


def shrunk_covariance(total: torch.Tensor, fourth: torch.Tensor, count: int) -> torch.Tensor:
    """(1 − α)·Σ + α·diag(Σ) for a sum Σ = Σ_t g_t g_tᵀ over ``count`` samples, with the Ledoit–Wolf
    intensity α for a diagonal target (Schäfer & Strimmer 2005): α = Σ_{i≠j} Var(s_ij) / Σ_{i≠j} s_ij²,
    from ``fourth`` = [Σ_t ‖g_t‖⁴, Σ_t Σ_i g_ti⁴]."""
    if count < 2:
        return total
    mean = total.double() / count  # S, (out, out)
    off_square = mean.pow(2).sum() - mean.diagonal().pow(2).sum()  # Σ_{i≠j} s_ij²
    off_fourth = (fourth[0] - fourth[1]) / count  # mean over t of Σ_{i≠j} (g_ti·g_tj)²
    variance = (off_fourth - off_square).clamp_min(0) / (count - 1)  # Σ_{i≠j} Var(s_ij)
    alpha = float((variance / off_square.clamp_min(1e-300)).clamp(0, 1))
    shrunk = total * (1 - alpha)
    shrunk.diagonal().copy_(total.diagonal())
    return shrunk


class LayerStatistics(Mapping):
    """What calibration measured for one layer: ``stats[key]`` for each collector's key, the tokens summed
    (``rows``: those routed to the layer, for an expert) and ``shared``, a memo the layers reading one input
    share (``stats.shared("cholesky", make)`` computes a derived matrix once for them, thread-safe)."""

    def __init__(self, values: dict[str, torch.Tensor], tokens: int, rows: int | None = None,
                 memo: "SharedMemo | None" = None):
        self.values, self.tokens = values, tokens
        self.rows = tokens if rows is None else rows
        self.memo = memo or SharedMemo()

    def __getitem__(self, key):
        return self.values[key]

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)

    def shared(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()``, computed once for the layers that share this layer's input."""
        return self.memo.get(key, make)

    def with_values(self, extra: dict[str, torch.Tensor]) -> "LayerStatistics":
        """These statistics with ``extra`` added (or replacing those keys)."""
        return LayerStatistics({**self.values, **extra}, self.tokens, self.rows, self.memo)


class SharedMemo:
    """Derived matrices shared by the layers reading one input, each made once (threads wait for it)."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def get(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self.lock:
            if key not in self.values:
                self.values[key] = make()
            return self.values[key]


class StatisticsHooks:
    """Forward (and output-gradient) hooks that run each layer's collectors over calibration batches.

    ``collectors[name]`` lists what layer ``name`` gathers. A ``per_input`` collector sums once per input
    tensor: consecutive layers reading the same tensor (q/k/v) share the first one's sum. ``dense(name,
    batch)`` gives the dense stream's input for dense-stream collectors. With ``stop``, the forward ends
    (:class:`Stop`) once the layers are seen: after the last one, or, when none of their collectors reads
    an output (``inputs_only``), before the first one runs, from its input alone. Call :meth:`new_batch`
    between batches and :meth:`statistics` at the end; hooks time themselves into ``timer`` as
    "statistics". The first batch's calls give the layers' groups (:meth:`groups`).
    """

    def __init__(self, modules: dict[str, nn.Module], collectors: dict[str, tuple[Collector, ...]],
                 timer: StageTimer | None = None, dense: Callable[[str, int], torch.Tensor] | None = None,
                 stop: bool = False):
        self.modules, self.timer, self.dense = modules, timer, dense
        self.collectors = {name: collectors.get(name, ()) for name in modules}
        self.sums: dict[str, dict] = {name: {} for name in modules}
        self.owner: dict[tuple[str, str], str] = {}  # (layer, collector key) → the layer whose sum it shares
        self.rows: dict[str, int] = {}  # input owner → rows summed
        self.input_owner: dict[str, str] = {}
        self.order: list[str] = []  # the first batch's calls, in order
        self.batch, self.tokens = 0, 0
        self.last: dict[str, tuple] = {}  # collector key → (input tensor, owner) of the last call
        names = list(modules)
        self.inputs_only = stop and not any(c.reads_output or c.gradient for cs in self.collectors.values() for c in cs)
        if self.inputs_only:
            first = modules[names[0]]
            self.handles = [first.register_forward_pre_hook(self._before(names))]
        else:
            self.handles = [module.register_forward_hook(self._hook(name, stop and name == names[-1]))
                            for name, module in modules.items()]

    def new_batch(self, tokens: int = 0) -> None:
        """Forget the last input seen (the next batch's tensors are new ones); count ``tokens``."""
        self.last.clear()
        self.batch += 1
        self.tokens += tokens

    def remove(self) -> None:
        self.last.clear()
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def groups(self) -> list[list[str]]:
        """The layers in call order, in runs reading one input tensor (q/k/v; o; gate/up; down)."""
        runs: list[list[str]] = []
        for name in self.order:
            if runs and self.input_owner[name] == self.input_owner[runs[-1][0]]:
                runs[-1].append(name)
            else:
                runs.append([name])
        return runs

    def statistics(self, tokens: int | None = None) -> dict[str, LayerStatistics]:
        """Each layer's finished statistics (shared sums finished once, the same tensors for the sharers)."""
        tokens = self.tokens if tokens is None else tokens
        finished: dict[tuple, dict] = {}
        memos: dict[str, SharedMemo] = {}
        result = {}
        for name in self.modules:
            values = {}
            for collector in self.collectors[name]:
                owner = self.owner.get((name, collector.key), name)
                if (owner, collector.key) not in finished:
                    finished[owner, collector.key] = collector.finish(self.sums[owner], tokens)
                values.update(finished[owner, collector.key])
            source = self.input_owner.get(name, name)
            result[name] = LayerStatistics(values, tokens, self.rows.get(source, 0), memos.setdefault(source, SharedMemo()))
        return result

    def _before(self, names: list[str]):
        def pre_hook(module, args):
            start = time.perf_counter()
            for name in names:
                self._add(name, self.modules[name], args[0], None)
            self._record(start)
            raise Stop
        return pre_hook

    def _hook(self, name: str, stop: bool):
        def forward_hook(module, args, output):
            start = time.perf_counter()
            self._add(name, module, args[0], output)
            self._record(start)
            if stop:
                raise Stop
        return forward_hook

    def _add(self, name: str, module: nn.Module, x: torch.Tensor, output: torch.Tensor | None) -> None:
        if self.batch == 0:
            self.order.append(name)
        call = LayerCall(module, x, output, self.dense(name, self.batch) if self.dense is not None else None)
        if self._owner("", name, x) == name:
            self.rows[name] = self.rows.get(name, 0) + x.numel() // x.shape[-1]
        self.input_owner[name] = self.owner[(name, "")]
        for collector in self.collectors[name]:
            if collector.gradient:
                if output is not None and output.requires_grad:
                    output.register_hook(lambda g, c=collector: self._timed(c.add_gradient, self.sums[name], g))
            elif not collector.per_input or self._owner(collector.key, name, x) == name:
                collector.add(self.sums[name], call)

    def _owner(self, key: str, name: str, x: torch.Tensor) -> str:
        """The layer whose ``key`` sum ``name`` adds to: itself, or the last one that read the same tensor."""
        tensor, owner = self.last.get(key, (None, None))
        if tensor is not x:
            self.last[key] = (x, name)
            owner = name
        self.owner[(name, key)] = owner
        return owner

    def _timed(self, function, *args) -> None:
        start = time.perf_counter()
        function(*args)
        self._record(start)

    def _record(self, start: float) -> None:
        if self.timer is not None:
            self.timer.record("statistics", time.perf_counter() - start)


def collectors_for(modules: dict[str, nn.Module], declared) -> dict[str, tuple[Collector, ...]]:
    """Each layer's collectors: those of ``declared`` that apply to its shape (duplicates once)."""
    unique = tuple(dict.fromkeys(declared))
    return {name: tuple(c for c in unique if c.applies(tuple(dense_weight(module).shape)))
            for name, module in modules.items()}


def statistics_bytes(shapes: list[tuple[int, int]], declared, peak: bool = False) -> int:
    """Bytes of the sums ``declared`` collectors hold for layers of ``shapes`` gathered together (a block's
    or a group's), a per-input sum counted once per distinct input width; with ``peak``, plus the largest
    moment's worth one :meth:`Collector.finish` takes on top."""
    unique, total, inputs = tuple(dict.fromkeys(declared)), 0, set()
    if peak:
        total = max((c.finish_bytes(shape) for c in unique for shape in shapes if c.applies(shape)), default=0)
    for collector in unique:
        for shape in shapes:
            if not collector.applies(shape):
                continue
            if collector.per_input:
                if (collector.key, shape[1]) in inputs:
                    continue
                inputs.add((collector.key, shape[1]))
            total += collector.nbytes(shape)
    return total


def forward_statistics(model: nn.Module, tokens: torch.Tensor, modules: dict[str, nn.Module], declared,
                       progress: bool = True) -> dict[str, LayerStatistics]:
    """``declared`` forward statistics of ``modules`` over one forward of the whole model per batch of
    ``tokens`` (no gradients, no blocks: for a model's spectra and for extraction, not for compression)."""
    hooks = StatisticsHooks(modules, collectors_for(modules, declared))
    try:
        with torch.no_grad():
            for ids in tqdm(batches(tokens), desc="calibrating", unit="batch", disable=not progress):
                forward(model, ids)
                hooks.new_batch(ids.numel())
    finally:
        hooks.remove()
    return hooks.statistics()
