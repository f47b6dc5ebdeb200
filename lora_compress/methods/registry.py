"""The compression methods by name: one config class, one handler and the statistics it needs, each.

    @register_method("sequential", SequentialConfig, summary="…", closed_loop=True,
                     statistics=(InputGram(), OutputGram(), InputDiagonal(), GradientCovariance()))
    def factor_sequential(weight, rank, stats: LayerStatistics, config: SequentialConfig, **solver) -> Factors:
        ...

A handler factors one layer: the dense weight W (out, in), the rank, what calibration measured for
that layer (``stats[key]`` for each declared collector's key: calibrate/collectors.py) and the method's
own config (its knobs). The passes that run before it follow from what it declares, never from its
name: no statistics, a data-free method; a forward statistic, a calibration forward; a gradient
statistic, a backward pass; a dense-stream statistic, the dense model run beside the compressed one;
``closed_loop``, block by block on the inputs the already compressed blocks produce. Adding a method,
or a statistic for it, is one config, one handler (and its Collector) and one test file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from ..calibrate.collectors import Collector, LayerStatistics
from ..core.svd import Factors
from ..errors import OptionError


@dataclass(frozen=True)
class MethodConfig:
    """Base class of a method's settings (its knobs): a frozen dataclass, validated on creation."""

    def settings(self) -> dict:
        """The knobs as plain JSON-able data."""
        return asdict(self)

    @property
    def input_shrinkage(self) -> float:
        """How far the method shrinks each input Gram towards its diagonal before whitening, in the fit
        and in the budget's costs alike (0: not at all)."""
        return 0.0


Handler = Callable[..., Factors]  # (weight, rank, LayerStatistics, config, *, solver, seed) → Factors
ExpertsHandler = Callable[..., list]  # (weights (E, out, in), rank, config, *, solver, seed) → [Factors] per expert


@dataclass(frozen=True)
class Method:
    """A registered method: its handler, its config class and the statistics it needs."""

    name: str
    config_class: type[MethodConfig]
    factor: Handler
    summary: str  # one line for --help and the model card
    statistics: tuple[Collector, ...] = ()  # what calibration gathers for each layer; empty: data-free
    closed_loop: bool = False  # block by block, on the inputs the already compressed blocks produce
    experts: ExpertsHandler | None = None  # factors the experts of one fused tensor together (a factor may be shared)

    @property
    def calibration(self) -> bool:
        """Needs calibration text (it declares statistics)."""
        return bool(self.statistics)

    @property
    def gradients(self) -> bool:
        """Needs the backward pass (a gradient statistic)."""
        return any(collector.gradient for collector in self.statistics)

    @property
    def dense_stream(self) -> bool:
        """Runs the dense model beside the compressed one (a dense-stream statistic)."""
        return any(collector.dense_stream for collector in self.statistics)

    @property
    def forward_statistics(self) -> tuple[Collector, ...]:
        return tuple(c for c in self.statistics if not c.gradient)

    @property
    def gradient_statistics(self) -> tuple[Collector, ...]:
        return tuple(c for c in self.statistics if c.gradient)

    def options(self, config: MethodConfig | None) -> MethodConfig:
        """``config``, or the default config of this method when None.

        Raises:
            OptionError: ``config`` belongs to another method.
        """
        if config is None:
            return self.config_class()
        if type(config) is not self.config_class:
            raise OptionError(f"{{options}} {type(config).__name__} configures another method than {self.name}; "
                              f"pass a {self.config_class.__name__}")
        return config


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_class: type[MethodConfig], *, summary: str,
                    statistics: tuple[Collector, ...] = (), closed_loop: bool = False,
                    experts: ExpertsHandler | None = None):
    """Decorator: register ``handler`` as the method ``name`` configured by ``config_class``, gathering
    ``statistics`` for it (calibrate/collectors.py); ``experts``, when given, factors the experts of one
    fused tensor together (data-free methods only).

    Example:
        >>> @register_method("asvd", AsvdConfig, statistics=(InputAbsMean(),), summary="ASVD's scaled SVD")
        ... def factor_asvd(weight, rank, stats, config, **solver): ...
    """
    if closed_loop and not statistics:
        raise ValueError(f"method {name!r}: a closed loop needs calibration statistics")

    def register(handler: Handler) -> Handler:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = Method(name, config_class, handler, summary, tuple(statistics), closed_loop, experts)
        return handler
    return register


def unregister_method(name: str) -> None:
    """Forget the method ``name`` (a test's or a script's own registration)."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        OptionError: no method of that name.
    """
    if name not in _METHODS:
        raise OptionError(f"{{method}} {name!r} is unknown; choose one of {', '.join(method_names())}")
    return _METHODS[name]


def method_of(config: MethodConfig) -> Method:
    """The method whose config class ``config`` is an instance of."""
    for method in _METHODS.values():
        if type(config) is method.config_class:
            return method
    raise OptionError(f"{{method}} {type(config).__name__} is not the config of a registered method")


def method_names() -> tuple[str, ...]:
    """Every registered name, in registration order (plain SVD first)."""
    return tuple(_METHODS)


def methods() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


__all__ = ["ExpertsHandler", "Handler", "LayerStatistics", "Method", "MethodConfig", "get_method", "method_names",
           "method_of", "methods", "register_method", "unregister_method"]
