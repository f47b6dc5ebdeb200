"""A model skeleton with one repeated block in memory at a time, read from safetensors shards.

    checkpoint.model (parameters on meta) ── outside tensors ──▶ in memory for the whole run
        embeddings, final norm, rotary, head, pooler         (read once at start, checkpoint dtype)
    blocks[i] ── loaded(i) ──▶ real (read from the shards, compute dtype) ── on exit ──▶ meta again

The calibrated pipeline (pipelines/calibrated.py) drives it as it drives a model in memory
(calibrate/block_source.py): the blocks' calls come from the model's own loop, and the head from the
model run with every block replaced by a given last-block output.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..calibrate.block_source import BlockSource
from ..core.pages import return_freed_memory
from ..calibrate.seq2seq import is_encoder_decoder
from ..errors import LoraCompressError
from ..core.layers import LowRankLinear
from .lazy import LazyCheckpoint, read_tensor


class BlockLoader(BlockSource):
    """The checkpoint's model with its outside tensors loaded and its repeated blocks on the meta device.

    A block's tensors are read from the shards when it is loaded, cast to the compute dtype; what is
    written goes back in the checkpoint's dtype.

    Raises:
        LoraCompressError: the model has no ModuleList of blocks holding linear layers, or is an encoder-decoder.
    """

    def __init__(self, checkpoint: LazyCheckpoint, device: str | torch.device = "cpu"):
        if is_encoder_decoder(checkpoint.model):
            raise LoraCompressError(f"{type(checkpoint.model).__name__} is an encoder-decoder: calibrated methods "
                                    f"stream decoder-only and encoder-only models block by block, not two stacks; "
                                    f"drop --stream (in memory they work), or stream plain SVD (--method svd)")
        super().__init__(checkpoint.model.requires_grad_(False), checkpoint.dtype, device)
        self.checkpoint = checkpoint
        self.sources = _checkpoint_names(checkpoint)
        self._load_outside()

    def _load_outside(self) -> None:
        read: dict[str, torch.Tensor] = {}  # checkpoint name → tensor: tied aliases share one
        for name, stored in self.sources.items():
            if not name.startswith(self.prefixes):
                if stored not in read:
                    read[stored] = self._read(name, self.storage_dtype, self.home)
                _assign(self.model, name, read[stored])

    def _read(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        tensor = read_tensor(self.checkpoint, self.sources[name])
        return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)

    @contextmanager
    def loaded(self, index: int):
        """Block ``index`` with its tensors read from the shards, in the compute dtype on the device; back on
        the meta device on exit. Modules swapped out while it is loaded (factored layers) are freed as well."""
        name, block = self.blocks[index]
        for key in block.state_dict():
            _assign(block, key, self._read(f"{name}.{key}", self.dtype, self.device))
        originals = list(block.modules())
        try:
            yield block
        finally:
            for key, tensor in block.state_dict(keep_vars=True).items():
                _assign(block, key, tensor.detach().to("meta"))
            for module in originals:
                for leaf, param in list(module.named_parameters(recurse=False)):
                    module.register_parameter(leaf, nn.Parameter(param.to("meta"), requires_grad=False))
            return_freed_memory()

    def tensors(self, index: int | None = None):
        """Yield ``(output name, tensor)`` of block ``index`` (None: outside the blocks), in model order.

        Names are those the in-memory path saves: factored layers give ``lora_A`` and ``lora_B``
        in place of ``weight``; of tied tensors only the checkpoint's output name.
        """
        prefix = self.blocks[index][0] + "." if index is not None else self.prefixes
        for key in self.checkpoint.keys:
            if key.startswith(prefix) == (index is not None):
                module_name, _, leaf = key.rpartition(".")
                module = self.model.get_submodule(module_name)
                if isinstance(module, LowRankLinear) and leaf == "weight":
                    yield f"{module_name}.lora_A", self._stored(module.lora_A)
                    yield f"{module_name}.lora_B", self._stored(module.lora_B)
                else:
                    yield key, self._stored(getattr(module, leaf))

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor as written: on the CPU, floats in the checkpoint's dtype, contiguous."""
        tensor = tensor.detach().cpu()
        return (tensor.to(self.storage_dtype) if tensor.is_floating_point() else tensor).contiguous()


def _checkpoint_names(checkpoint: LazyCheckpoint) -> dict[str, str]:
    """Every state-dict name of the model, tied aliases included → the checkpoint name holding it."""
    groups: dict[int, list[str]] = {}
    for name, tensor in checkpoint.model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return {alias: checkpoint.keys[name] for names in groups.values() for name in names if name in checkpoint.keys
            for alias in names}


def _assign(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer ``name`` (a frozen parameter stays one)."""
    module_name, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_name)
    if isinstance(getattr(module, leaf), nn.Parameter):
        module.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    else:
        module.register_buffer(leaf, tensor)
