"""Where the calibrated pipeline finds a model's blocks: all in memory (here), or read one at a time (stream/).

    calls = source.calls(tokens, stack)          every block's calls in a stack, from the model's own loop
    with source.loaded(i) as block:              block i ready to compute: in the compute dtype, on the device
    source.exit(stack, ids, hidden)              what leaves a stack given its last block's output: the
                                                 model's output (the last stack), or what the next reads

A model has one stack of repeated blocks, or two (an encoder-decoder: the encoder's, then the decoder's,
whose calls read the encoder's output). A block is cast to the compute dtype (float32 for a
half-precision checkpoint on a device without fast kernels for it: core/precision.py) only while it is
worked on, so the model stays in the checkpoint's dtype and what is stored keeps it. The hidden states,
the calls' tensors and the statistics are in the compute dtype throughout.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..core.pages import return_freed_memory
from ..core.precision import compute_dtype
from ..errors import LoraCompressError, OptionError
from .blocks import block_calls, block_stack, captured_block_calls, find_blocks, returns_tuple
from .forward import forward
from .seq2seq import encoder_decoder_parts, encoder_outputs, token_embeddings


class BlockSource:
    """A model's repeated blocks, handed out one at a time; subclasses say how a block is made ready.

    Raises:
        LoraCompressError: the model has no ModuleList of blocks holding linear layers.
    """

    def __init__(self, model: nn.Module, storage_dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.model = model
        self.stacks = _stacks(model)
        if not self.stacks:
            raise OptionError(f"{type(model).__name__} has no repeated blocks of linear layers (a ModuleList); "
                              f"calibrated methods work block by block: use the data-free {{method}} svd")
        self.blocks: list[tuple[str, nn.Module]] = [block for stack in self.stacks for block in stack]
        self.prefixes = tuple(stack[0][0].rpartition(".")[0] + "." for stack in self.stacks)
        self.device = torch.device(device)
        self.storage_dtype = storage_dtype
        self.dtype = compute_dtype(storage_dtype, self.device)
        self.tails: dict[int, list[tuple]] = {}  # block → per batch, what its call returns beside the hidden states

    @property
    def encoder_decoder(self) -> bool:
        return len(self.stacks) == 2

    def stack_blocks(self, stack: int) -> range:
        """The indices (into ``blocks``) of the blocks of stack ``stack``."""
        start = sum(len(s) for s in self.stacks[:stack])
        return range(start, start + len(self.stacks[stack]))

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
        return {n: m for n, m in targets.items() if not n.startswith(self.prefixes)}

    def calls(self, tokens: torch.Tensor, stack: int = 0, upstream: list[torch.Tensor] | None = None,
              outside: dict[str, nn.Module] | None = None) -> list[list[tuple[tuple, dict]]]:
        """Every call of the blocks of ``stack``, one (args, kwargs) per calibration batch: ``calls[k][batch]``
        for its k-th block; a decoder's calls read ``upstream``, the encoder's output per batch. The
        embeddings' output is cast to the compute dtype and device, so what the model derives from it
        (rotary tables, masks) is too.

        Raises:
            LoraCompressError: a target of ``outside`` runs before the first block.
        """
        seen = []
        handles = [m.register_forward_hook(lambda *_, n=n: seen.append(n)) for n, m in (outside or {}).items()]
        try:
            with self._computing_embeddings():
                calls = self._calls(tokens, stack, upstream)
        finally:
            for handle in handles:
                handle.remove()
        if seen and stack == 0:
            raise OptionError(f"{seen[0]} runs before the first block, which block-by-block calibration does not "
                              f"support; exclude it ({{exclude}} '{seen[0]}')")
        return calls

    def _calls(self, tokens, stack, upstream):
        blocks = [block for _, block in self.stacks[stack]]
        indices = list(self.stack_blocks(stack))
        if self.encoder_decoder:  # the first block hands the others position biases: capture real calls
            calls, tails = captured_block_calls(self.model, blocks, tokens, encoder_outputs(upstream))
            self.tails.update(zip(indices, tails))
            return calls
        with self.loaded(0) as first:
            tuple_output = returns_tuple(self.model, first, tokens)
        self.tails.update({i: [()] for i in indices} if tuple_output else {i: None for i in indices})
        return block_calls(self.model, blocks, tokens, tuple_output)

    def exit(self, stack: int, ids: torch.Tensor, hidden: torch.Tensor, batch: int = 0,
             upstream: torch.Tensor | None = None, features: bool = False):
        """What leaves stack ``stack`` when its last block outputs ``hidden`` on batch ``batch`` (token ids
        ``ids``): the encoder's output for an encoder-decoder's first stack, else the model's output
        (``upstream``: the encoder's output the decoder reads). The small modules outside the blocks (final
        norm, pooler) run in the compute dtype. With ``features`` the output embedding (lm_head) is skipped:
        ``output.logits`` holds its inputs, for a loss a block of the vocabulary at a time
        (calibrate/head_loss.py)."""
        head = self.model.get_output_embeddings() if features else None
        blocks = [self.blocks[i] for i in self.stack_blocks(stack)]
        for index, (_, block) in zip(self.stack_blocks(stack), blocks):
            tail = self.tails.get(index)
            block.forward = (lambda *a, t=tail, **k: hidden) if tail is None else \
                (lambda *a, t=tail, **k: (hidden, *t[min(batch, len(t) - 1)]))
        if head is not None:
            head.forward = lambda x: x
        small = self._small_outside(skip=head)
        for module in small:
            module.to(self.device, self.dtype)
        try:
            with self._computing_embeddings():
                if self.encoder_decoder and stack == 0:
                    return self.model.get_encoder()(input_ids=ids.to(self.device)).last_hidden_state
                return forward(self.model, ids, **({"encoder_outputs": encoder_outputs([upstream])[0]}
                                                   if upstream is not None else {}))
        finally:
            for _, block in blocks:
                del block.forward
            if head is not None:
                del head.forward
            for module in small:
                module.to(self.home, self.storage_dtype)

    @contextmanager
    def _computing_embeddings(self):
        """The input embeddings' output cast to the compute dtype and device while inside."""
        handles = [module.register_forward_hook(lambda m, a, output: output.to(self.device, self.dtype))
                   for module in token_embeddings(self.model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @property
    def home(self) -> torch.device:
        """Where the model's weights live between uses (the CPU unless the whole model was put elsewhere)."""
        return torch.device("cpu")

    def _small_outside(self, skip: nn.Module | None) -> list[nn.Module]:
        """Modules outside the blocks with weights of their own, but the embeddings (only looked up) and ``skip``."""
        large = {id(module) for module in token_embeddings(self.model)} | {id(skip)}
        return [module for name, module in self.model.named_modules()
                if name and not name.startswith(self.prefixes) and id(module) not in large
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


def _stacks(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """The stacks of blocks compressed in turn: the encoder's and then the decoder's of an encoder-decoder
    (calibrate/seq2seq.py), else the one stack of :func:`find_blocks`."""
    stacks = []
    for prefix, part in encoder_decoder_parts(model):
        found = block_stack(part)
        if found is not None:
            name = f"{prefix}.{found[0]}" if prefix else found[0]
            stacks.append([(f"{name}.{i}", block) for i, block in enumerate(found[1])])
    if len(stacks) == 2:
        return stacks
    blocks = find_blocks(model)
    return [blocks] if blocks else []

