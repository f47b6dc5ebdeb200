"""Where a calibrated pass finds the model's blocks: all in memory (here), or read one at a time (stream/).

    calls = source.inputs(tokens, outside)   every block's calls, from the model's own loop
    with source.loaded(i) as block:          block i ready to compute: in the compute dtype, on the device
    source.head(ids, hidden)                 the model's output with every block replaced by ``hidden``

A block is cast to the compute dtype (float32 for a half-precision checkpoint on a device without
fast kernels for it: core/precision.py) only while it is worked on, so the model stays in the
checkpoint's dtype and what is stored keeps it. The hidden states, the calls' tensors and the
statistics are in the compute dtype throughout.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..core.pages import return_freed_memory
from ..core.precision import compute_dtype
from ..errors import LoraCompressError
from .blocks import block_calls, find_blocks, returns_tuple
from .forward import forward


class RunsBeforeBlocks(LoraCompressError):
    """A target runs before the first block: its output gradient would need a backward through the embeddings."""


class BlockSource:
    """A model's repeated blocks, handed out one at a time; subclasses say how a block is made ready.

    Raises:
        LoraCompressError: the model has no ModuleList of blocks holding linear layers.
    """

    def __init__(self, model: nn.Module, storage_dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.model = model
        self.blocks: list[tuple[str, nn.Module]] = find_blocks(model)
        if not self.blocks:
            raise LoraCompressError(f"{type(model).__name__} has no repeated blocks of linear layers "
                                    f"(a ModuleList) to stream calibration through; drop --stream")
        self.prefix = self.blocks[0][0].rpartition(".")[0] + "."
        self.device = torch.device(device)
        self.storage_dtype = storage_dtype
        self.dtype = compute_dtype(storage_dtype, self.device)
        self.tuple_output = None  # whether a block returns a tuple; learnt by inputs()

    @contextmanager
    def loaded(self, index: int):
        """Block ``index`` ready to compute (subclasses)."""
        raise NotImplementedError
        yield

    def members(self, targets: dict[str, nn.Module], index: int) -> dict[str, nn.Module]:
        """The targets inside block ``index``."""
        return {n: m for n, m in targets.items() if n.startswith(self.blocks[index][0] + ".")}

    def outside(self, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The targets outside every block (e.g. a pooler)."""
        return {n: m for n, m in targets.items() if not n.startswith(self.prefix)}

    def inputs(self, tokens: torch.Tensor, outside: dict[str, nn.Module]) -> list[list[tuple[tuple, dict]]]:
        """Every block's (args, kwargs), one pair per calibration batch: ``calls[block][batch]``; the
        embeddings' output is cast to the compute dtype and device, so what the model derives from it
        (rotary tables, masks) is too.

        Raises:
            RunsBeforeBlocks: a target runs before the first block.
        """
        seen = []
        handles = [m.register_forward_hook(lambda *_, n=n: seen.append(n)) for n, m in outside.items()]
        handles.append(self.model.get_input_embeddings().register_forward_hook(
            lambda module, args, output: output.to(self.device, self.dtype)))
        try:
            with self.loaded(0) as first:
                self.tuple_output = returns_tuple(self.model, first, tokens)
            calls = block_calls(self.model, [block for _, block in self.blocks], tokens, self.tuple_output)
        finally:
            for handle in handles:
                handle.remove()
        if seen:
            raise RunsBeforeBlocks(f"{seen[0]} runs before the first block, which calibration block by block "
                                   f"does not support; --exclude it or drop --stream")
        return calls

    def head(self, ids: torch.Tensor, hidden: torch.Tensor, features: bool = False):
        """The model's output on ``ids`` with every block replaced by ``hidden``, the last block's output.

        The small modules outside the blocks (final norm, pooler) run in the compute dtype. With
        ``features`` the output embedding (lm_head) is skipped: ``output.logits`` holds its inputs,
        for a loss computed a block of the vocabulary at a time (calibrate/head_loss.py).
        """
        if self.tuple_output is None:
            raise RuntimeError("BlockSource.head needs BlockSource.inputs first, to learn the blocks' output type")

        def replay(*args, **kwargs):
            return (hidden,) if self.tuple_output else hidden

        head = self.model.get_output_embeddings() if features else None
        for _, block in self.blocks:
            block.forward = replay
        if head is not None:
            head.forward = lambda x: x
        small = self._small_outside(skip=head)
        for module in small:
            module.to(self.device, self.dtype)
        try:
            return forward(self.model, ids)
        finally:
            for _, block in self.blocks:
                del block.forward
            if head is not None:
                del head.forward
            for module in small:
                module.to(self.home, self.storage_dtype)

    @property
    def home(self) -> torch.device:
        """Where the model's weights live between uses (the CPU unless the whole model was put elsewhere)."""
        return torch.device("cpu")

    def _small_outside(self, skip: nn.Module | None) -> list[nn.Module]:
        """Modules outside the blocks with weights of their own, but the embeddings (only looked up) and ``skip``."""
        large = {id(self.model.get_input_embeddings()), id(skip)}
        return [module for name, module in self.model.named_modules()
                if name and not name.startswith(self.prefix) and id(module) not in large
                and any(True for _ in module.parameters(recurse=False))]


class ResidentBlocks(BlockSource):
    """A model in memory, each block cast to the compute dtype (and moved to the device) while it is used."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu"):
        parameter = next(model.parameters())
        super().__init__(model, parameter.dtype, device)
        self._home = parameter.device

    @property
    def home(self) -> torch.device:
        return self._home

    @contextmanager
    def loaded(self, index: int):
        """Block ``index`` in the compute dtype on the device; back in the storage dtype at home on exit
        (factors put into it meanwhile included)."""
        block = self.blocks[index][1]
        block.to(self.device, self.dtype)
        try:
            yield block
        finally:
            block.to(self.home, self.storage_dtype)
            return_freed_memory()
