"""Factor a model's targeted layers in place: rank choice per layer, then the swap.

    compress_(model, CompressConfig(ratio=0.5))  →  CompressionReport

Rank options (exactly one): ``rank`` (same r everywhere), ``ratio`` (keep fraction p of each
layer's parameters, r = floor(p·m·n/(m+n))), ``energy`` (smallest r keeping fraction E of Σσ²).
A layer whose rank would not save parameters (r ≥ m·n/(m+n)) stays dense and is reported so.

Speed rule (``max_keep``, default 0.9): a factored layer does r·(m+n) multiply-adds per token
against m·n, and runs faster in proportion (measured at 1 and 2,048 tokens, benchmarks/speed.md)
until it keeps about 90% of the weights, where it breaks even. So a layer is factored only at
ranks keeping at most ``max_keep`` of its weights; above that it stays dense.
"""
from __future__ import annotations

import math
from contextlib import closing
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import svd as svdmath
from .errors import LoraCompressError
from .layers import dense_weight, is_conv1d
from .patch import factor_module_
from .targets import find_targets
from .workers import layer_workers, ordered_map

RANK_OPTIONS = ("rank", "ratio", "energy", "budget")
METHODS = ("svd", "whiten", "sequential", "sequential-refit")  # plain SVD, then the activation-aware ones (aware.py)
CALIBRATED_DEFAULT = "sequential"  # the method used when calibration text is given and none is named
MAX_KEEP = 0.9  # default --max-keep: the speed rule (below)


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how; validated on creation."""

    rank: int | None = None  # one rank for every targeted layer
    ratio: float | None = None  # keep this fraction of each layer's parameters
    energy: float | None = None  # keep this fraction of each layer's Σσ²
    budget: float | None = None  # keep this fraction of all targeted parameters, ranks per layer
    method: str = "auto"  # svd | whiten | sequential; auto = sequential with calib, else svd
    include: tuple[str, ...] = ()  # regexes on module names; empty = all linear layers
    exclude: tuple[str, ...] = ()  # regexes on module names to leave dense
    svd: str = "auto"  # auto | full | randomized | gram
    seed: int = 0  # seed of the randomized SVD
    factor_all: bool = False  # factor even layers whose rank saves no parameters (or breaks max_keep)
    max_keep: float = MAX_KEEP  # speed rule: a layer is factored only at ranks keeping ≤ this share of its weights
    calib: str | None = None  # calibration text (file, or a datasets name), recorded in the manifest
    calib_samples: int = 32  # calibration sequences
    calib_len: int = 256  # tokens per calibration sequence
    device: str = "cpu"  # where the SVDs run: cpu | cuda | cuda:N (factors are stored on the CPU)
    workers: int = 0  # plain SVD: layers factored at once, each on its share of the threads; 0 = auto (workers.py)

    def __post_init__(self):
        chosen = [name for name in RANK_OPTIONS if getattr(self, name) is not None]
        if len(chosen) != 1:
            given = ", ".join(f"--{n}" for n in chosen) or "none"
            raise LoraCompressError(f"give exactly one of --rank, --ratio, --energy, --budget (got {given})")
        if self.rank is not None and self.rank <= 0:
            raise LoraCompressError(f"--rank {self.rank} must be a positive integer")
        if self.workers < 0:
            raise LoraCompressError(f"--workers {self.workers} is negative; pass 0 (auto) or a count of layers")
        for name in ("ratio", "energy", "budget", "max_keep"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= 1):
                flag = "--" + name.replace("_", "-")
                raise LoraCompressError(f"{flag} {value} is outside (0, 1]; pass a fraction such as 0.5")
        if self.svd not in svdmath.SVD_METHODS:
            raise LoraCompressError(f"--svd {self.svd!r} is unknown; choose one of {', '.join(svdmath.SVD_METHODS)}")
        self._check_calibration()
        check_device(self.device)

    def _check_calibration(self) -> None:
        if self.method == "auto":
            object.__setattr__(self, "method", CALIBRATED_DEFAULT if self.calib else "svd")
        if self.method not in METHODS:
            raise LoraCompressError(f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.calib_samples < 1 or self.calib_len < 2:
            raise LoraCompressError(f"--calib-samples {self.calib_samples} / --calib-len {self.calib_len} are too "
                                    f"small; pass at least 1 sample of at least 2 tokens")
        if self.budget is not None and self.method == "svd":
            raise LoraCompressError("--budget needs calibration text and an activation-aware method; "
                                    "pass --calib FILE (and --method whiten or sequential, not svd)")

    def settings(self) -> dict:
        """The config as plain JSON-able data."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @property
    def allocation_max_keep(self) -> float:
        """``max_keep`` for the budget allocation: 1.0 with ``factor_all`` (break-even alone bounds it)."""
        return 1.0 if self.factor_all else self.max_keep

    def rank_limit(self, shape: tuple[int, int]) -> int:
        """The largest rank a layer of ``shape`` (out, in) is factored at; above it the layer stays dense."""
        return min(shape) if self.factor_all else svdmath.max_factored_rank(*shape, self.max_keep)

    def dense_note(self, rank: int, shape: tuple[int, int]) -> str:
        """Why a layer of ``shape`` stays dense at ``rank`` (past :meth:`rank_limit`)."""
        if rank > svdmath.break_even_rank(*shape):
            return f"rank {rank} would not save parameters (break-even {svdmath.break_even_rank(*shape)}); left dense"
        return (f"rank {rank} keeps {rank * sum(shape) / (shape[0] * shape[1]):.0%} of the weights, over "
                f"--max-keep {self.max_keep} (slower than dense there); left dense")


@dataclass
class LayerResult:
    """What happened to one targeted layer."""

    name: str
    shape: tuple[int, int]  # (out, in) in nn.Linear orientation
    rank: int | None  # None: left dense
    bias: bool
    conv1d: bool
    energy_kept: float | None = None  # of W (or W·L when whitened)
    note: str = ""

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def params(self) -> int:
        """Weight parameters after compression (bias not counted)."""
        return self.dense_params if self.rank is None else self.rank * sum(self.shape)


@dataclass
class CompressionReport:
    """Per-layer outcome of compress_, with totals over the targeted layers' weights."""

    config: CompressConfig
    layers: list[LayerResult] = field(default_factory=list)
    calibration: dict | None = None  # calibrated methods: settings, sensitivity, peak memory, seconds

    @property
    def dense_params(self) -> int:
        return sum(layer.dense_params for layer in self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def manifest_layers(self) -> dict:
        return {layer.name: {"shape": list(layer.shape), "rank": layer.rank, "bias": layer.bias,
                             "conv1d": layer.conv1d, "energy_kept": layer.energy_kept, "note": layer.note}
                for layer in self.layers}


def check_device(device: str) -> None:
    """Reject a device that is unknown or absent on this machine, naming the fix."""
    if device != "cpu" and not device.startswith("cuda"):
        raise LoraCompressError(f"--device {device!r} is unknown; choose cpu or cuda (cuda:N for one GPU)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoraCompressError(f"--device {device} was asked but CUDA is not available here "
                                f"(torch {torch.__version__}); pass --device cpu or install a CUDA build of torch")


def check_finite_float(name: str, weight: torch.Tensor) -> None:
    """Reject integer/quantised and non-finite weights with a message naming the layer."""
    if not weight.is_floating_point():
        raise LoraCompressError(f"{name}.weight is {weight.dtype} (quantised); dequantise the model first")
    if not bool(torch.isfinite(weight).all()):
        raise LoraCompressError(f"{name}.weight contains NaN or inf; repair or re-download the checkpoint")


def compress_(model: nn.Module, config: CompressConfig, progress: bool = True,
              tokens: torch.Tensor | None = None) -> CompressionReport:
    """Factor every targeted layer of ``model`` in place (plain SVD, or activation-aware with ``tokens``).

    Args:
        model: a transformers model (or any nn.Module with nn.Linear / Conv1D layers).
        config: rank option, targets, method and SVD settings.
        progress: show a progress bar over layers.
        tokens: calibration token ids (samples, length), needed by every method but ``svd``
            (see :func:`lora_compress.calibrate.calibration_tokens`).

    Returns:
        A CompressionReport listing each targeted layer's rank (None when left dense).

    Example:
        >>> report = compress_(model, CompressConfig(ratio=0.5))
        >>> report.params / report.dense_params
        0.49...

    Raises:
        LoraCompressError: a bad rank for some layer, a pattern matching nothing, a bad weight.
    """
    if config.method != "svd":
        check_calibrated(config, tokens)
        from .aware import compress_calibrated_  # aware.py builds on this module's dataclasses

        return compress_calibrated_(model, config, tokens, progress)
    targets = find_targets(model, config.include, config.exclude)
    _check_fixed_rank(targets, config.rank)
    report = CompressionReport(config)
    workers = factoring_workers(config, targets)
    with closing(ordered_map(lambda target: _factor_target(target, config), targets.items(), workers)) as outcomes:
        for name, (result, factors) in tqdm(zip(targets, outcomes), total=len(targets), desc="factoring",
                                            unit="layer", disable=not progress):
            if factors is not None:
                factor_module_(model, name, factors)
            report.layers.append(result)
    return report


def factoring_workers(config: CompressConfig, targets: dict[str, nn.Module]) -> int:
    """Layers of ``targets`` to factor at once under ``config`` (workers.layer_workers)."""
    return layer_workers(config.workers, [tuple(dense_weight(m).shape) for m in targets.values()], config.device)


def _factor_target(target: tuple[str, nn.Module], config: CompressConfig):
    """(LayerResult, Factors or None) for one ``(name, module)``; the module is not touched."""
    result = new_layer_result(*target)
    return result, factor_weight(result, dense_weight(target[1]), config)


def check_calibrated(config: CompressConfig, tokens) -> None:
    """Refuse an activation-aware method without calibration tokens (or text)."""
    if config.method != "svd" and tokens is None:
        raise LoraCompressError(f"--method {config.method} needs calibration text; pass --calib FILE")


def _check_fixed_rank(targets: dict[str, nn.Module], rank: int | None) -> None:
    if rank is None:
        return
    for name, module in targets.items():
        out_features, in_features = dense_weight(module).shape
        if rank > min(out_features, in_features):
            raise LoraCompressError(f"--rank {rank} is larger than {name} ({out_features}×{in_features}) allows "
                                    f"({min(out_features, in_features)}); choose a lower rank or --exclude it")


def layer_rank(config: CompressConfig, shape: tuple[int, int], singular_values=None) -> int:
    """The rank the config asks for on a layer of ``shape`` (energy needs the spectrum)."""
    if config.rank is not None:
        return config.rank
    if config.ratio is not None:
        rank = svdmath.rank_for_ratio(*shape, config.ratio)
        if rank < 1:
            smallest = math.ceil(sum(shape) / (shape[0] * shape[1]) * 1000) / 1000
            raise LoraCompressError(f"--ratio {config.ratio} leaves rank 0 for a {shape[0]}×{shape[1]} layer; "
                                    f"use --ratio {smallest} or more")
        return rank
    return svdmath.rank_for_energy(singular_values, config.energy)


def new_layer_result(name: str, module: nn.Module) -> LayerResult:
    """A LayerResult for a still-dense module, with its shape and kind."""
    weight = dense_weight(module)
    return LayerResult(name, tuple(weight.shape), None, getattr(module, "bias", None) is not None,
                       is_conv1d(module))


@torch.no_grad()
def factor_weight(result: LayerResult, weight: torch.Tensor, config: CompressConfig,
                  whitening: torch.Tensor | None = None, rank: int | None = None) -> svdmath.Factors | None:
    """Factors of one (out, in) weight on ``config.device``, or None when it stays dense.

    Fills in ``result`` (rank, energy kept, or the note saying why it stays dense). A fixed rank
    past ``config.rank_limit`` is skipped before any SVD is computed.
    """
    check_finite_float(result.name, weight)
    if rank is None and config.energy is None:
        rank = layer_rank(config, result.shape)
    limit = config.rank_limit(result.shape)
    if rank is not None and rank > limit:
        result.note = config.dense_note(rank, result.shape)
        return None
    svd_kind = "full" if rank is None else config.svd
    whitening = whitening.to(config.device) if whitening is not None else None
    factors = svdmath.factorize(weight.to(config.device), rank or min(result.shape), whitening=whitening,
                                svd=svd_kind, seed=config.seed)
    if rank is None:
        rank = layer_rank(config, result.shape, factors.singular_values)
        factors = svdmath.truncate(factors, rank)
    if rank > limit:
        result.note = config.dense_note(rank, result.shape)
        return None
    result.rank, result.energy_kept = rank, factors.energy_kept
    return factors
