"""The repeated transformer blocks of a model, and how each is called: THE one notion of a block.

A model's blocks are the children of its ModuleList that holds the most linear layers
(``model.layers`` in Llama, ``encoder.layer`` in BERT, ``transformer.h`` in GPT-2); a block's
modules are named ``<stack>.<index>.<layer type>``. Calibration runs the model with its blocks
swapped for recorders to learn every block's call (hidden states, masks, position embeddings),
then replays blocks one at a time on hidden states of its own.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..core.targets import is_factorable
from .forward import forward
from .tokens import batches

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")  # a block's child in a module name: "<stack>.<index>."


def block_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(name, ModuleList)`` of the model's blocks: the ModuleList whose children hold the most linear
    layers (the first such in model order); None when no ModuleList holds any."""
    best, held_best = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            held = sum(1 for child in module.modules() if is_factorable(child))
            if held > held_best:
                best, held_best = (name, module), held
    return best


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks as ``[("model.layers.0", block), …]`` (empty without a block stack)."""
    stack = block_stack(model)
    return [] if stack is None else [(f"{stack[0]}.{i}", block) for i, block in enumerate(stack[1])]


def split_name(name: str) -> tuple[int | None, str]:
    """``(block index, layer type)`` of a module name, read off the name alone (a manifest has no model):
    ``model.layers.3.self_attn.q_proj`` → ``(3, "self_attn.q_proj")``; ``(None, name)`` outside the blocks."""
    match = _BLOCK_INDEX.search(name)
    if match is None:
        return None, name
    return int(match.group(1)), name[match.end():]


def block_input(args, kwargs) -> torch.Tensor:
    """The hidden states of a block call: its first positional argument, else its first keyword."""
    return args[0] if args else next(iter(kwargs.values()))


class Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are seen."""


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, tokens: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives, one pair per calibration batch."""
    captured = []

    def pre_hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise Stop

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        _forward_until_stopped(model, tokens)
    finally:
        handle.remove()
    return captured


def _forward_until_stopped(model: nn.Module, tokens: torch.Tensor) -> None:
    """The model on every calibration batch, each forward cut short where a hook raises Stop."""
    for ids in batches(tokens):
        try:
            forward(model, ids)
        except Stop:
            pass


@torch.no_grad()
def returns_tuple(model: nn.Module, block: nn.Module, tokens: torch.Tensor) -> bool:
    """Whether ``block`` (its weights in memory) returns a tuple: one call on the first sequence."""
    args, kwargs = block_inputs(model, block, tokens[:1])[0]
    return isinstance(block(*args, **kwargs), tuple)


@torch.no_grad()
def block_calls(model: nn.Module, blocks: list[nn.Module], tokens: torch.Tensor,
                tuple_output: bool) -> list[list[tuple[tuple, dict]]]:
    """Every block's (args, kwargs), one pair per calibration batch: ``calls[i][batch]``.

    Blocks may be called differently (sliding-window and full-attention layers get different
    masks). Each block is swapped for a recorder that passes its input through unchanged, so the
    model's own loop makes every call without running any block (the blocks may be on the meta
    device); ``tuple_output`` says what form the loop expects back. Only the first block's hidden
    states are real (see :func:`block_hidden`).
    """
    calls = [[] for _ in blocks]

    def recorder(index: int):
        def record(*args, **kwargs):
            calls[index].append((args, kwargs))
            if index == len(blocks) - 1:
                raise Stop
            return (block_input(args, kwargs),) if tuple_output else block_input(args, kwargs)
        return record

    for index, block in enumerate(blocks):
        block.forward = recorder(index)
    try:
        _forward_until_stopped(model, tokens)
    finally:
        for block in blocks:
            del block.forward
    return calls


@torch.no_grad()
def captured_block_calls(model: nn.Module, blocks: list[nn.Module], tokens: torch.Tensor,
                         encoder_outputs: list | None = None) -> tuple[list[list], list[list | None]]:
    """Every block's (args, kwargs) as :func:`block_calls` gives them, captured from a real forward of the
    model (its blocks in memory, run up to the last one), and what each call returned beside its hidden
    states (None for a block returning a tensor). For blocks that hand the next block more than hidden
    states, which a recorder cannot make up: T5's first block computes the position biases the others
    receive. ``encoder_outputs``: per batch, the encoder's output a decoder's blocks read.

    Returns:
        ``(calls[k][batch], tails[k][batch] or None)``.
    """
    calls, tails = [[] for _ in blocks], [[] for _ in blocks]

    def record_output(index):
        def hook(module, args, output):
            if isinstance(output, tuple) and tails[index] is not None:
                tails[index].append(tuple(output[1:]))
            else:
                tails[index] = None
            if index == len(blocks) - 1:
                raise Stop
        return hook

    handles = [block.register_forward_pre_hook(lambda _m, args, kwargs, i=index: calls[i].append((args, kwargs)),
                                               with_kwargs=True) for index, block in enumerate(blocks)]
    handles += [block.register_forward_hook(record_output(index)) for index, block in enumerate(blocks)]
    try:
        for batch, ids in enumerate(batches(tokens)):
            extra = {} if encoder_outputs is None else {"encoder_outputs": encoder_outputs[batch]}
            try:
                forward(model, ids, **extra)
            except Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return calls, tails


def block_hidden(calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The hidden states of captured block calls (see :func:`block_calls`), one per batch."""
    return [block_input(*call) for call in calls]


def call_block(block: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor:
    """``block`` on ``hidden`` with the other arguments of a captured call; its output hidden states."""
    args, kwargs = call
    if args:
        output = block(hidden, *args[1:], **kwargs)
    else:
        output = block(**{**kwargs, "hidden_states": hidden})
    return output[0] if isinstance(output, tuple) else output  # (B, T, C)


