"""A model skeleton with one repeated block in memory at a time, read from safetensors shards.

    checkpoint.model (parameters on meta) ── outside tensors ──▶ in memory for the whole run
        embeddings, final norm, rotary, head, pooler         (read once at start)
    blocks[i] ── loaded(i) ──▶ real (read from the shards) ── on exit ──▶ meta again

Two forwards drive the calibration: :meth:`BlockLoader.inputs` runs the model with its blocks swapped
for recorders and captures every block's call (hidden states, mask, position embeddings) as
calibrate.blocks.block_calls does; :meth:`BlockLoader.head` runs the model with every block replaced by a
given last-block output, so the model's own code applies the final norm, head, pooler and loss
inputs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..calibrate.blocks import block_calls, find_blocks, returns_tuple
from ..calibrate.forward import forward
from ..calibrate.seq2seq import is_encoder_decoder
from ..core.layers import LowRankLinear
from ..errors import LoraCompressError
from .lazy import LazyCheckpoint, read_tensor


class BlockLoader:
    """The checkpoint's model with its outside tensors loaded and its repeated blocks on the meta device.

    Raises:
        LoraCompressError: the model has no ModuleList of blocks holding linear layers, or is an encoder-decoder.
    """

    def __init__(self, checkpoint: LazyCheckpoint):
        self.checkpoint, self.model = checkpoint, checkpoint.model.requires_grad_(False)
        if is_encoder_decoder(self.model):
            raise LoraCompressError(f"{type(self.model).__name__} is an encoder-decoder: calibrated methods stream "
                                    f"decoder-only and encoder-only models block by block, not two stacks; drop "
                                    f"--stream (in memory they work), or stream plain SVD (--method svd)")
        self.blocks: list[tuple[str, nn.Module]] = find_blocks(self.model)
        if not self.blocks:
            raise LoraCompressError(f"{type(self.model).__name__} has no repeated blocks of linear layers "
                                    f"(a ModuleList) to stream calibration through; drop --stream")
        self.prefix = self.blocks[0][0].rpartition(".")[0] + "."
        self.sources = _checkpoint_names(checkpoint)
        self.tuple_output = None  # whether a block returns a tuple; learnt by inputs()
        self._load_outside()

    def _load_outside(self) -> None:
        read: dict[str, torch.Tensor] = {}  # checkpoint name → tensor: tied aliases share one
        for name, stored in self.sources.items():
            if not name.startswith(self.prefix):
                if stored not in read:
                    read[stored] = self._read(name)
                _assign(self.model, name, read[stored])

    def _read(self, name: str) -> torch.Tensor:
        tensor = read_tensor(self.checkpoint, self.sources[name])
        return tensor.to(self.checkpoint.dtype) if tensor.is_floating_point() else tensor

    def members(self, targets: dict[str, nn.Module], index: int) -> dict[str, nn.Module]:
        """The targets inside block ``index``."""
        return {n: m for n, m in targets.items() if n.startswith(self.blocks[index][0] + ".")}

    def outside(self, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The targets outside every block (e.g. a pooler)."""
        return {n: m for n, m in targets.items() if not n.startswith(self.prefix)}

    @contextmanager
    def loaded(self, index: int):
        """Block ``index`` with its tensors read from the shards; back on the meta device on exit.

        Modules swapped out while it is loaded (factored layers) are freed as well.
        """
        name, block = self.blocks[index]
        for key in block.state_dict():
            _assign(block, key, self._read(f"{name}.{key}"))
        originals = list(block.modules())
        try:
            yield block
        finally:
            for key, tensor in block.state_dict(keep_vars=True).items():
                _assign(block, key, tensor.detach().to("meta"))
            for module in originals:
                for leaf, param in list(module.named_parameters(recurse=False)):
                    module.register_parameter(leaf, nn.Parameter(param.to("meta"), requires_grad=False))

    def inputs(self, tokens: torch.Tensor, outside: dict[str, nn.Module]) -> list[list[tuple[tuple, dict]]]:
        """Every block's (args, kwargs), one pair per calibration batch: ``calls[block][batch]``.

        Raises:
            LoraCompressError: a target runs before the first block (its output gradient would
                need a backward through the embeddings, which the streamed pass does not do).
        """
        seen = []
        handles = [m.register_forward_hook(lambda *_, n=n: seen.append(n)) for n, m in outside.items()]
        try:
            with self.loaded(0) as first:
                self.tuple_output = returns_tuple(self.model, first, tokens)
            calls = block_calls(self.model, [block for _, block in self.blocks], tokens, self.tuple_output)
        finally:
            for handle in handles:
                handle.remove()
        if seen:
            raise LoraCompressError(f"{seen[0]} runs before the first block, which streamed calibration does not "
                                    f"support; --exclude it or drop --stream")
        return calls

    def head(self, ids: torch.Tensor, hidden: torch.Tensor):
        """The model's output on ``ids`` with every block replaced by ``hidden``, the last block's output."""
        if self.tuple_output is None:
            raise RuntimeError("BlockLoader.head needs BlockLoader.inputs first, to learn the blocks' output type")

        def replay(*args, **kwargs):
            return (hidden,) if self.tuple_output else hidden

        for _, block in self.blocks:
            block.forward = replay
        try:
            return forward(self.model, ids)
        finally:
            for _, block in self.blocks:
                del block.forward

    def tensors(self, index: int | None = None):
        """Yield ``(output name, tensor)`` of block ``index`` (None: outside the blocks), in model order.

        Names are those the in-memory path saves: factored layers give ``lora_A`` and ``lora_B``
        in place of ``weight``; of tied tensors only the checkpoint's output name.
        """
        prefix = self.blocks[index][0] + "." if index is not None else self.prefix
        for key in self.checkpoint.keys:
            if key.startswith(prefix) == (index is not None):
                module_name, _, leaf = key.rpartition(".")
                module = self.model.get_submodule(module_name)
                if isinstance(module, LowRankLinear) and leaf == "weight":
                    yield f"{module_name}.lora_A", module.lora_A.detach().contiguous()
                    yield f"{module_name}.lora_B", module.lora_B.detach().contiguous()
                else:
                    yield key, getattr(module, leaf).detach().contiguous()


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
