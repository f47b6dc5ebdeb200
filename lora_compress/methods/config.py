"""What to compress and how: one frozen config for every method, validated on creation.

Rank options (exactly one): ``rank`` (same r everywhere), ``ratio`` (keep fraction p of each
layer's parameters, r = floor(p·m·n/(m+n))), ``energy`` (smallest r keeping fraction E of Σσ²),
``budget`` (keep fraction p of all targeted parameters, ranks per layer). A layer whose rank would
not save parameters (r ≥ m·n/(m+n)) stays dense and is reported so.

Speed rule (``max_keep``, default 0.9): a factored layer does r·(m+n) multiply-adds per token
against m·n, and runs faster in proportion (measured at 1 and 2,048 tokens, benchmarks/speed.md)
until it keeps about 90% of the weights, where it breaks even. So a layer is factored only at
ranks keeping at most ``max_keep`` of its weights; above that it stays dense.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch

from ..core import svd as svdmath
from ..errors import LoraCompressError, LoraCompressWarning
from .registry import Method, MethodConfig, get_method, method_of

RANK_OPTIONS = ("rank", "ratio", "energy", "budget")
CALIBRATED_DEFAULT = "sequential"  # the method used when calibration text is given and none is named
MAX_KEEP = 0.9  # default --max-keep: the speed rule (above)
EXPERT_MIN_TOKENS = 16  # default --expert-min-tokens (calibrate/experts.py; BENCHMARKS.md: whitening on fewer tokens)


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how; validated on creation.

    Example:
        >>> CompressConfig(budget=0.8, calib="asyoulik.txt")                      # the default method
        >>> CompressConfig(budget=0.8, calib="asyoulik.txt", method=SequentialConfig(fisher_damping=0.05))
    """

    rank: int | None = None  # one rank for every targeted layer
    ratio: float | None = None  # keep this fraction of each layer's parameters
    energy: float | None = None  # keep this fraction of each layer's Σσ²
    budget: float | None = None  # keep this fraction of all targeted parameters, ranks per layer
    method: str | MethodConfig = "auto"  # a registered name or a method's config; auto = sequential with calib, else svd
    options: MethodConfig | None = None  # the method's knobs (None: its defaults); set from ``method`` when a config is given
    include: tuple[str, ...] = ()  # regexes on module names; empty = all linear layers
    exclude: tuple[str, ...] = ()  # regexes on module names to leave dense
    svd: str = "auto"  # SVD solver: auto | full | randomized | gram
    seed: int = 0  # seed of the randomized SVD
    factor_all: bool = False  # factor even layers whose rank saves no parameters (or breaks max_keep)
    max_keep: float = MAX_KEEP  # speed rule: a layer is factored only at ranks keeping ≤ this share of its weights
    calib: str | None = None  # calibration text (file, or a datasets name), recorded in the manifest
    calib_samples: int = 32  # calibration sequences
    calib_len: int = 256  # tokens per calibration sequence
    calib_generated: float = 0.0  # share of the calibration sequences the model writes from its BOS (1: data-free)
    device: str = "cpu"  # where the SVDs run: cpu | cuda | cuda:N (factors are stored on the CPU)
    workers: int = 0  # layers factored at once (calibrated: a group's), each on its share of the threads; 0 = auto
    expert_min_tokens: int = EXPERT_MIN_TOKENS  # calibrated: an expert routed fewer tokens is factored from its weights

    def __post_init__(self):
        chosen = [name for name in RANK_OPTIONS if getattr(self, name) is not None]
        if len(chosen) != 1:
            given = ", ".join(f"--{n}" for n in chosen) or "none"
            raise LoraCompressError(f"give exactly one of --rank, --ratio, --energy, --budget (got {given})")
        if self.rank is not None and self.rank <= 0:
            raise LoraCompressError(f"--rank {self.rank} must be a positive integer")
        if self.workers < 0:
            raise LoraCompressError(f"--workers {self.workers} is negative; pass 0 (auto) or a count of layers")
        if self.expert_min_tokens < 0:
            raise LoraCompressError(f"--expert-min-tokens {self.expert_min_tokens} is negative; pass 0 or more")
        for name in ("ratio", "energy", "budget", "max_keep"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= 1):
                flag = "--" + name.replace("_", "-")
                raise LoraCompressError(f"{flag} {value} is outside (0, 1]; pass a fraction such as 0.5")
        if self.svd not in svdmath.SVD_METHODS:
            raise LoraCompressError(f"--svd {self.svd!r} is unknown; choose one of {', '.join(svdmath.SVD_METHODS)}")
        self._resolve_method()
        self._check_calibration()
        check_device(self.device)

    def _resolve_method(self) -> None:
        """``method`` becomes the registered name and ``options`` that method's config."""
        method, options = self.method, self.options
        if isinstance(method, MethodConfig):
            method, options = method_of(method).name, method
        elif method == "auto":
            method = CALIBRATED_DEFAULT if self.calib or self.data_free else "svd"
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "options", get_method(method).options(options))

    def _check_calibration(self) -> None:
        if not 0 <= self.calib_generated <= 1:
            raise LoraCompressError(f"--calib-generated {self.calib_generated} is outside [0, 1]; pass a share of "
                                    f"the calibration sequences such as 0.25")
        if 0 < self.calib_generated < 1 and not self.calib:
            raise LoraCompressError(f"--calib-generated {self.calib_generated:g} mixes written sequences into the "
                                    f"--calib text; pass --calib FILE, or --calib-generated 1 for no text at all")
        if self.calib_generated and not self.record.calibration:
            raise LoraCompressError(f"--calib-generated writes calibration text, which --method {self.method} does "
                                    f"not use; pass a calibrated method (sequential) or drop --calib-generated")
        if self.calib_samples < 1 or self.calib_len < 2:
            raise LoraCompressError(f"--calib-samples {self.calib_samples} / --calib-len {self.calib_len} are too "
                                    f"small; pass at least 1 sample of at least 2 tokens")
        if self.budget is not None and not self.record.calibration:
            raise LoraCompressError("--budget needs calibration text and an activation-aware method; "
                                    "pass --calib FILE or --calib-generated 1, and --method whiten or sequential "
                                    "(not svd)")
        if self.calib and self.data_free:
            warnings.warn("--calib is unused with --calib-generated 1 (the model writes every calibration sequence)",
                          LoraCompressWarning, stacklevel=3)
        if self.calib and not self.record.calibration:
            warnings.warn(f"--calib is unused by --method {self.method} (plain SVD needs no calibration text)",
                          LoraCompressWarning, stacklevel=3)

    @property
    def data_free(self) -> bool:
        """True when the model writes every calibration sequence itself (``calib_generated == 1``)."""
        return self.calib_generated == 1

    @property
    def record(self) -> Method:
        """The registered method: its handler and what it needs."""
        return get_method(self.method)

    @property
    def needs_gradients(self) -> bool:
        """True when the method or the budget uses the output-gradient moments (a backward pass):
        the budget allocation's cost is the Fisher-weighted truncation loss (methods/ranks.py)."""
        return self.record.gradients or self.budget is not None

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


def check_device(device: str) -> None:
    """Reject a device that is unknown or absent on this machine, naming the fix."""
    if device != "cpu" and not device.startswith("cuda"):
        raise LoraCompressError(f"--device {device!r} is unknown; choose cpu or cuda (cuda:N for one GPU)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoraCompressError(f"--device {device} was asked but CUDA is not available here "
                                f"(torch {torch.__version__}); pass --device cpu or install a CUDA build of torch")
