"""What compression did: one LayerResult per targeted layer, and the CompressionReport of a run."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..core.layers import dense_weight, is_conv1d
from ..storage.manifest import LayerEntry
from .config import CompressConfig


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
    shared: tuple[str, str] | None = None  # (factor, layer): its lora_A or lora_B is that layer's (a shared basis)

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def params(self) -> int:
        """Weight parameters after compression (bias not counted; a factor shared with another layer
        is that layer's)."""
        if self.rank is None:
            return self.dense_params
        if self.shared is None:
            return self.rank * sum(self.shape)
        return self.rank * (self.shape[1] if self.shared[0] == "lora_B" else self.shape[0])



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

    def manifest_layers(self) -> dict[str, LayerEntry]:
        """The manifest's layer table: what each layer became."""
        return {layer.name: LayerEntry(tuple(layer.shape), layer.rank, layer.bias, layer.conv1d, layer.energy_kept,
                                       layer.note, tuple(layer.shared) if layer.shared else None)
                for layer in self.layers}


def new_layer_result(name: str, module: nn.Module) -> LayerResult:
    """A LayerResult for a still-dense module, with its shape and kind."""
    weight = dense_weight(module)
    return LayerResult(name, tuple(weight.shape), None, getattr(module, "bias", None) is not None,
                       is_conv1d(module))
