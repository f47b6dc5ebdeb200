"""Two configs: what a method is (:class:`CompressConfig`, the recipe a folder records and a later run
repeats) and how one run goes (:class:`RunConfig`: calibration, device, workers, streaming, dtype,
memory). Each is frozen and checks its own fields on creation; :func:`resolve` checks the two together
once and names the method ``auto`` stands for.

Rank options (exactly one): ``rank`` (same r everywhere), ``ratio`` (keep fraction p of each
layer's parameters, r = floor(p·m·n/(m+n))), ``energy`` (smallest r keeping fraction E of Σσ²),
``budget`` (keep fraction p of all targeted parameters, ranks per layer), ``max_loss_rise`` (the smallest
model whose predicted rise of the mean next-token loss, in nats, stays under X; measured on held-out
calibration sequences and tightened when over: pipelines/target.py). A layer whose rank would
not save parameters (r ≥ m·n/(m+n)) stays dense and is reported so.

Speed rule (``max_keep``, default 0.9): a factored layer does r·(m+n) multiply-adds per token
against m·n, and runs faster in proportion (measured at 1 and 2,048 tokens, benchmarks/speed.md)
until it keeps about 90% of the weights, where it breaks even. So a layer is factored only at
ranks keeping at most ``max_keep`` of its weights; above that it stays dense.

Errors name fields as ``{field}`` (errors.OptionError): ``budget`` in Python, ``--budget`` on the
command line.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, fields

import torch

from ..core import svd as svdmath
from ..errors import OptionError, OptionWarning
from ..storage.manifest import Manifest
from .registry import Method, MethodConfig, get_method, method_of

RANK_OPTIONS = ("rank", "ratio", "energy", "budget", "max_loss_rise")
SIZE_OPTIONS = RANK_OPTIONS[:4]  # the options that state a size; max_loss_rise states a quality
CALIBRATED_DEFAULT = "sequential"  # the method used when calibration text is given and none is named
MAX_KEEP = 0.9  # default max_keep: the speed rule (above)
EXPERT_MIN_TOKENS = 16  # default expert_min_tokens (calibrate/experts.py; BENCHMARKS.md: whitening on fewer tokens)
DTYPES = ("float32", "float16", "bfloat16")
GENERATED_SHARE = 0.25  # default share of calibration sequences a causal LM writes from prompts (research-domains.md)


FORMER_NAMES = {"svd": "solver", "fisher_damping": "output_damping", "fisher_floor": "output_floor",
                "gram_shrinkage": "input_shrinkage"}  # a manifest written before the names settled still reads


@dataclass(frozen=True)
class CompressConfig:
    """What to compress and how: the method, its knobs, the rank rule and the targets.

    Example:
        >>> CompressConfig(budget=0.8)                                            # the default method
        >>> CompressConfig(budget=0.8, method=SequentialConfig(output_damping=0.05))
    """

    rank: int | None = None  # one rank for every targeted layer
    ratio: float | None = None  # keep this fraction of each layer's parameters
    energy: float | None = None  # keep this fraction of each layer's Σσ²
    budget: float | None = None  # keep this fraction of all targeted parameters, ranks per layer
    max_loss_rise: float | None = None  # the smallest model whose mean next-token loss rises by at most this (nats)
    method: str | MethodConfig = "auto"  # a registered name or a method's config; auto = sequential with calibration
    options: MethodConfig | None = None  # the method's knobs (None: its defaults); set from ``method`` when a config is given
    include: tuple[str, ...] = ()  # regexes on module names; empty = all linear layers
    exclude: tuple[str, ...] = ()  # regexes on module names to leave dense
    solver: str = "auto"  # SVD solver of the data-free methods: auto | full | randomized | gram
    seed: int = 0  # every random step: the randomized SVD, the calibration labels drawn, the text the model writes
    factor_all: bool = False  # factor even layers whose rank saves no parameters (or breaks max_keep)
    max_keep: float = MAX_KEEP  # speed rule: a layer is factored only at ranks keeping ≤ this share of its weights
    expert_min_tokens: int = EXPERT_MIN_TOKENS  # calibrated: an expert routed fewer tokens is factored from its weights

    def __post_init__(self):
        chosen = [name for name in RANK_OPTIONS if getattr(self, name) is not None]
        check_loss_target(self.max_loss_rise, chosen)
        if len(chosen) != 1:
            given = ", ".join("{" + n + "}" for n in chosen) or "none"
            raise OptionError(f"give exactly one of {{rank}}, {{ratio}}, {{energy}}, {{budget}}, {{max_loss_rise}} "
                              f"(got {given})")
        if self.rank is not None and self.rank <= 0:
            raise OptionError(f"{{rank}} {self.rank} must be a positive integer")
        if self.expert_min_tokens < 0:
            raise OptionError(f"{{expert_min_tokens}} {self.expert_min_tokens} is negative; pass 0 or more")
        for name in ("ratio", "energy", "budget", "max_keep"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= 1):
                raise OptionError(f"{{{name}}} {value} is outside (0, 1]; pass a fraction such as 0.5")
        if self.solver not in svdmath.SVD_METHODS:
            raise OptionError(f"{{solver}} {self.solver!r} is unknown; choose one of {', '.join(svdmath.SVD_METHODS)}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        method, options = self.method, self.options
        if isinstance(method, MethodConfig):
            method, options = method_of(method).name, method
            object.__setattr__(self, "method", method)
        if method != "auto":
            object.__setattr__(self, "options", get_method(method).options(options))

    @property
    def record(self) -> Method:
        """The registered method: its handler and the statistics it declares (after :func:`resolve`)."""
        if self.method == "auto":
            raise RuntimeError("CompressConfig.record before resolve(): 'auto' names no method yet")
        return get_method(self.method)

    @property
    def needs_gradients(self) -> bool:
        """True when the method or the budget uses the output-gradient moments (a backward pass):
        the budget allocation's cost is the Fisher-weighted truncation loss (methods/ranks.py)."""
        return self.record.gradients or self.allocated

    @property
    def allocated(self) -> bool:
        """True when ranks come from the allocation over every layer's cost (``budget`` or ``max_loss_rise``)."""
        return self.budget is not None or self.max_loss_rise is not None

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
                f"max_keep {self.max_keep} (slower than dense there); left dense")

    def to_dict(self) -> dict:
        """The recipe as plain JSON-able data (the method's knobs under ``options``)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        data["options"] = self.options.settings() if self.options is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "CompressConfig":
        """The config :meth:`to_dict` wrote (unknown keys, such as a run's settings in an older manifest, are
        ignored)."""
        known = {f.name for f in fields(cls)}
        data = {FORMER_NAMES.get(key, key): value for key, value in data.items()}
        values = {key: value for key, value in data.items() if key in known}
        options = values.pop("options", None)
        if options is not None and values.get("method", "auto") != "auto":
            options = {FORMER_NAMES.get(key, key): value for key, value in options.items()}
            values["options"] = get_method(values["method"]).config_class(**options)
        for key in ("include", "exclude"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)


@dataclass(frozen=True)
class RunConfig:
    """How one run goes: the calibration text and its size, where and how wide it computes, how it holds
    the model (in memory or streamed), the stored dtype and the memory it may take.

    Example:
        >>> RunConfig(calib="asyoulik.txt")                        # 32 sequences of 256 tokens
        >>> RunConfig(calib="asyoulik.txt", stream=True, memory_limit="20G")
    """

    calib: str | None = None  # calibration text (a file, or a datasets name), recorded in the manifest
    calib_samples: int = 32  # calibration sequences
    calib_len: int = 256  # tokens per calibration sequence
    calib_generated: float | None = None  # share of the calibration sequences the model writes from prompts
    # (1: data-free; None: GENERATED_SHARE for a causal LM with a tokenizer, all of them without calib, 0 for others)
    device: str = "cpu"  # where the passes and the SVDs run: cpu | cuda | cuda:N (factors are stored on the CPU)
    workers: int = 0  # layers factored at once (calibrated: a group's), each on its share of the threads; 0 = auto
    stream: bool = False  # one tensor (data-free) or one block (calibrated) in memory at a time
    dtype: str | None = None  # the output's dtype: float32 | float16 | bfloat16 (None: the checkpoint's)
    memory_limit: int | str | None = None  # bytes (or "20G") this run may take; None: what the machine has
    heal_minutes: float | None = None  # compress job only: then heal the factors this long on the calibration tokens
    heal_lr: float | None = None  # peak learning rate of that healing (None: jobs/heal_step.py's HEAL_LR)

    def __post_init__(self):
        for name in ("heal_minutes", "heal_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise OptionError(f"{{{name}}} {value} must be positive (minutes of healing / a learning rate); "
                                  f"drop it for no healing")
        if self.workers < 0:
            raise OptionError(f"{{workers}} {self.workers} is negative; pass 0 (auto) or a count of layers")
        if self.calib_generated is not None and not 0 <= self.calib_generated <= 1:
            raise OptionError(f"{{calib_generated}} {self.calib_generated} is outside [0, 1]; pass a share of the "
                              f"calibration sequences such as 0.25")
        if self.calib_samples < 1 or self.calib_len < 2:
            raise OptionError(f"{{calib_samples}} {self.calib_samples} / {{calib_len}} {self.calib_len} are too "
                              f"small; pass at least 1 sample of at least 2 tokens")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise OptionError(f"{{dtype}} {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        check_device(self.device)

    @property
    def data_free(self) -> bool:
        """True when the model writes every calibration sequence itself: ``calib_generated`` 1, or left to its
        default with no ``calib`` text."""
        return self.calib_generated == 1 or (self.calib_generated is None and not self.calib)

    def generated_share(self, can_write: bool, has_text: bool) -> float:
        """The share of calibration sequences the model writes: the one asked, else :data:`GENERATED_SHARE` when
        the model ``can_write`` (a causal LM with a tokenizer for the prompts) and the run ``has_text``, all of
        them with no text, none for a model that cannot write (an encoder)."""
        if self.calib_generated is not None:
            return self.calib_generated
        return 0.0 if not can_write else GENERATED_SHARE if has_text else 1.0

    @property
    def calibrated(self) -> bool:
        """True when this run has calibration text (given, or written by the model)."""
        return bool(self.calib) or self.data_free

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The config :meth:`to_dict` wrote (unknown keys ignored: an older manifest's single settings)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def resolve(config: CompressConfig, run: RunConfig, tokens_given: bool = False) -> CompressConfig:
    """Check ``config`` and ``run`` together, once; returns ``config`` with ``auto`` replaced by the method
    it stands for (``sequential`` with calibration text, else ``svd``). ``tokens_given``: the caller hands
    calibration tokens over itself (the in-place API).

    Raises:
        OptionError: settings that contradict each other, naming the fields and the fix.
    """
    calibrated = run.calibrated or tokens_given
    if config.method == "auto":  # --budget alone calibrates on text the model writes (its default share: all)
        writes = run.calib_generated == 1 or (run.calib_generated is None and config.budget is not None)
        config = dataclasses.replace(config, method=CALIBRATED_DEFAULT if run.calib or tokens_given or writes
                                     else "svd")
    method = config.record
    if run.calib_generated is not None and 0 < run.calib_generated < 1 and not run.calib:
        raise OptionError(f"{{calib_generated}} {run.calib_generated:g} mixes written sequences into the {{calib}} "
                          f"text; pass {{calib}} FILE, or {{calib_generated}} 1 for no text at all")
    if run.calib_generated and not method.calibration:
        raise OptionError(f"{{calib_generated}} writes calibration text, which {{method}} {method.name} does not "
                          f"use; pass a calibrated method (sequential) or drop {{calib_generated}}")
    if config.budget is not None and not method.calibration:
        raise OptionError("{budget} needs calibration text and an activation-aware method; pass {calib} FILE or "
                          "{calib_generated} 1, and {method} whiten or sequential (not svd)")
    if config.max_loss_rise is not None and not ((run.calib or tokens_given) and method.calibration):
        raise OptionError("{max_loss_rise} measures the loss on held-out calibration text; pass {calib} FILE and a "
                          "calibrated method (sequential, whiten)")
    if method.calibration and not calibrated:
        raise OptionError(f"{{method}} {method.name} needs calibration text; pass {{calib}} FILE (or "
                          f"{{calib_generated}} 1: the model writes its own)")
    if run.calib and run.data_free:
        warnings.warn(OptionWarning("{calib} is unused with {calib_generated} 1 (the model writes every "
                                    "calibration sequence)"), stacklevel=3)
    if run.calib and not method.calibration and run.heal_minutes is None:  # healing trains on it
        warnings.warn(OptionWarning(f"{{calib}} is unused by {{method}} {method.name} (plain SVD needs no "
                                    f"calibration text)"), stacklevel=3)
    if method.calibration and config.solver != "auto":
        warnings.warn(OptionWarning(f"{{solver}} {config.solver} is unused by {{method}} {method.name}: a calibrated "
                                    f"method decomposes each whitened matrix exactly (eigh); the solver serves the "
                                    f"data-free methods"), stacklevel=3)
    return config


def check_loss_target(value: float | None, chosen: list[str]) -> None:
    """Refuse a ``max_loss_rise`` that is not a positive number of nats, or that comes with a size option."""
    if value is None:
        return
    sizes = [name for name in chosen if name in SIZE_OPTIONS]
    if sizes:
        given = ", ".join("{" + n + "}" for n in sizes)
        raise OptionError(f"{{max_loss_rise}} chooses the size itself; drop {given} (or drop {{max_loss_rise}})")
    if not value > 0 or value == float("inf"):
        raise OptionError(f"{{max_loss_rise}} {value} must be a positive loss rise in nats, such as 0.2")


def check_device(device: str) -> None:
    """Reject a device that is unknown or absent on this machine, naming the fix."""
    if device != "cpu" and not device.startswith("cuda"):
        raise OptionError(f"{{device}} {device!r} is unknown; choose cpu or cuda (cuda:N for one GPU)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"{{device}} {device} was asked but CUDA is not available here "
                          f"(torch {torch.__version__}); pass cpu or install a CUDA build of torch")


def recipe_configs(manifest: Manifest) -> tuple[dict, dict]:
    """The settings of the two configs a manifest records, as plain data: ``settings`` (the method's config)
    and ``run`` (a folder written before the split recorded both under ``settings``)."""
    settings = dict(manifest.settings)
    run = dict(manifest.run or settings)
    return ({key: value for key, value in settings.items() if key in CompressConfig.__dataclass_fields__},
            {key: value for key, value in run.items() if key in RunConfig.__dataclass_fields__})
