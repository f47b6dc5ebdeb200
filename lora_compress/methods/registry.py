"""The compression methods by name: one config class and one handler each.

    @register_method("sequential", SequentialConfig, summary="…", calibration=True, gradients=True,
                     closed_loop=True)
    def factor_sequential(weight, rank, inputs: LayerInputs, config: SequentialConfig, **solver) -> Factors:
        ...

A handler factors one layer: the dense weight W (out, in), the rank, what calibration measured for
that layer (:class:`LayerInputs`) and the method's own config (its knobs). Which passes run before
it is read from its record (:class:`Method`), never from its name: a calibration forward for the
input Grams, a backward for the output-gradient moments, the closed loop block by block, the dense
stream beside it. Adding a method is one config, one handler and one test file.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..core.svd import Factors
from ..errors import LoraCompressError


@dataclass(frozen=True)
class MethodConfig:
    """Base class of a method's settings (its knobs): a frozen dataclass, validated on creation."""

    def settings(self) -> dict:
        """The knobs as plain JSON-able data."""
        return asdict(self)

    @property
    def gram_shrinkage(self) -> float:
        """How far the method shrinks each input Gram towards its diagonal before whitening, in the fit
        and in the budget's costs alike (0: not at all)."""
        return 0.0


@dataclass(frozen=True)
class LayerInputs:
    """What calibration measured for one layer; all None for the data-free plain SVD."""

    gram: torch.Tensor | None = None  # C = X_cᵀX_c of the inputs the factors will see, (in, in) float64
    cholesky: torch.Tensor | None = None  # L with L·Lᵀ = C (layers reading one input share it)
    cross: torch.Tensor | None = None  # X_dᵀX_c with the dense model's inputs, (in, in): dense_stream methods
    fisher: torch.Tensor | None = None  # output-gradient covariance F (out, out), or its diagonal (out,)
    output_gram: torch.Tensor | None = None  # Σ (W·x)(W·x)ᵀ = W·C·Wᵀ, (out, out): for out ≤ in, in place of C
    input_diagonal: torch.Tensor | None = None  # diag(C) = Σ x², (in,): to shrink an output Gram


Handler = Callable[..., Factors]  # (weight, rank, LayerInputs, config, *, svd, seed) → Factors
ExpertsHandler = Callable[..., list]  # (weights (E, out, in), rank, config, *, svd, seed) → [Factors] per expert


@dataclass(frozen=True)
class Method:
    """A registered method: its handler, its config class and what it needs before it can run."""

    name: str
    config_class: type[MethodConfig]
    factor: Handler
    summary: str  # one line for --help and the model card
    calibration: bool = False  # needs calibration text: the input Gram of each layer
    gradients: bool = False  # uses the output-gradient moments F (one backward pass over the calibration text)
    closed_loop: bool = False  # block by block, on the inputs the already compressed blocks produce
    dense_stream: bool = False  # also runs the dense model beside it, for the cross-Gram X_dᵀX_c
    experts: ExpertsHandler | None = None  # factors the experts of one fused tensor together (a factor may be shared)

    def options(self, config: MethodConfig | None) -> MethodConfig:
        """``config``, or the default config of this method when None.

        Raises:
            LoraCompressError: ``config`` belongs to another method.
        """
        if config is None:
            return self.config_class()
        if type(config) is not self.config_class:
            raise LoraCompressError(f"{type(config).__name__} configures another method than {self.name}; pass a "
                                    f"{self.config_class.__name__}")
        return config


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_class: type[MethodConfig], *, summary: str, calibration: bool = False,
                    gradients: bool = False, closed_loop: bool = False, dense_stream: bool = False,
                    experts: ExpertsHandler | None = None):
    """Decorator: register ``handler`` as the method ``name`` configured by ``config_class``; ``experts``,
    when given, factors the experts of one fused tensor together (data-free methods only)."""
    def register(handler: Handler) -> Handler:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = Method(name, config_class, handler, summary, calibration, gradients, closed_loop,
                                dense_stream, experts)
        return handler
    return register


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        LoraCompressError: no method of that name.
    """
    if name not in _METHODS:
        raise LoraCompressError(f"--method {name!r} is unknown; choose one of {', '.join(method_names())}")
    return _METHODS[name]


def method_of(config: MethodConfig) -> Method:
    """The method whose config class ``config`` is an instance of."""
    for method in _METHODS.values():
        if type(config) is method.config_class:
            return method
    raise LoraCompressError(f"{type(config).__name__} is not the config of a registered method")


def method_names() -> tuple[str, ...]:
    """Every registered name, in registration order (plain SVD first)."""
    return tuple(_METHODS)


def methods() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())
