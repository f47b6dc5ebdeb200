"""The closed loop: compress block by block on the inputs the already compressed model produces.

Two streams of hidden states run through the blocks: the dense model's and the compressed
model's. Inside a block, layers that read the same tensor form a group (q/k/v; o; gate/up;
down), compressed in call order, each group seeing the inputs that the already compressed
groups produce.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import Stop, block_calls, block_hidden, block_stack, call_block, captured_block_calls, find_blocks, \
    returns_tuple
from .seq2seq import encoder_decoder_parts
from ..core.layers import dense_weight
from ..core.whitening import output_side as _output_side
from .statistics import accumulate, flat_features, output_features


def _record_inputs(block, members, calls, hidden) -> tuple[list[list[str]], dict, list]:
    """Run the dense block, keeping each group's inputs; returns groups, inputs, block outputs.

    A group is a run of consecutive layer calls reading the same tensor (q/k/v; gate/up).
    """
    groups, inputs, state = [], {}, {"last": None, "first_batch": True}

    def hook(name):
        def forward_hook(module, args, output):
            x, shared = args[0], args[0] is state["last"]
            state["last"] = x
            if state["first_batch"]:
                groups[-1].append(name) if shared else groups.append([name])
            if not shared:
                inputs.setdefault(name, []).append(x.detach())
        return forward_hook

    handles = [m.register_forward_hook(hook(n)) for n, m in members.items()]
    outputs = []
    try:
        for call, h in zip(calls, hidden):
            outputs.append(call_block(block, call, h))
            state.update(last=None, first_batch=False)
    finally:
        for handle in handles:
            handle.remove()
    return groups, inputs, outputs


def _group_statistics(block, modules: dict[str, nn.Module], calls, hidden, dense_inputs, output_side: bool):
    """Sums over the compressed stream for one group of layers reading one input: the input's Gram (for
    the layers summed on their input side), its cross-Gram with the dense inputs (with ``dense_inputs``),
    and, with ``output_side``, the output Gram of each layer with out ≤ in (calibrate/statistics.py).
    Each batch's block forward stops once the group's last layer has run.

    Returns:
        ``(gram or None, cross or None, {name: output Gram}, the diagonal of the input's Gram)``.
    """
    on_output = {n for n, m in modules.items() if output_side and dense_inputs is None
                 and _output_side(tuple(dense_weight(m).shape))}
    sums, outputs, state = {}, {}, {"index": 0, "seen": 0}
    last = list(modules)[-1]

    def hook(name):
        def forward_hook(module, args, output):
            if "diagonal" not in state:  # every layer of the group reads this input
                accumulate(sums, "diagonal", flat_features(args[0]).double().pow(2).sum(0))
                state["diagonal"] = True
            if name in on_output:
                features = output_features(module, output)  # (tokens, out)
                accumulate(outputs, name, features.T @ features)
            elif "gram" not in state:
                x_c = flat_features(args[0])  # (tokens, in)
                accumulate(sums, "gram", x_c.T @ x_c)
                if dense_inputs is not None:
                    accumulate(sums, "cross", flat_features(dense_inputs[state["index"]]).T @ x_c)
                state["gram"] = True
            if name == last:
                raise Stop
        return forward_hook

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for index, (call, h) in enumerate(zip(calls, hidden)):
            state["index"] = index
            state.pop("gram", None)
            state.pop("diagonal", None)
            try:
                call_block(block, call, h)
            except Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return sums.get("gram"), sums.get("cross"), outputs, sums.get("diagonal")


def block_stacks(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """The stacks of blocks compressed in turn: the encoder's and then the decoder's of an encoder-decoder
    (calibrate/seq2seq.py), else the one stack of :func:`find_blocks`."""
    stacks = []
    for prefix, part in encoder_decoder_parts(model):
        found = block_stack(part)
        if found is not None:
            name = f"{prefix}.{found[0]}" if prefix else found[0]
            stacks.append([(f"{name}.{i}", block) for i, block in enumerate(found[1])])
    return stacks or [find_blocks(model)]


@torch.no_grad()
def run_sequential(model: nn.Module, tokens: torch.Tensor, targets: dict[str, nn.Module], compress_group,
                   progress: bool = True, dense_stream: bool = True) -> dict[str, nn.Module]:
    """Compress block by block, feeding each group the inputs the compressed model produces.

    ``compress_group(names, gram, cross)`` factors the layers ``names`` (which share one input)
    given ``gram`` = X_cᵀX_c of the compressed stream's inputs and ``cross`` = X_dᵀX_c with the
    dense stream's inputs, both (in, in) float64; without ``dense_stream`` the dense model is not
    run alongside (one block pass fewer per block) and ``cross`` is None. An encoder-decoder's encoder
    is compressed first; the decoder's block calls are then taken from the model with the compressed
    encoder.

    Returns:
        The targets outside the blocks (e.g. a pooler), left for the caller.
    """
    stacks = [blocks for blocks in block_stacks(model)
              if any(target.startswith(name + ".") for name, _ in blocks for target in targets)]
    for blocks in stacks:
        modules = [block for _, block in blocks]
        if encoder_decoder_parts(model):
            calls = captured_block_calls(model, modules, tokens)
        else:
            calls = block_calls(model, modules, tokens, returns_tuple(model, modules[0], tokens))
        compressed = block_hidden(calls[0])
        dense = compressed if dense_stream else None
        for (block_name, block), block_call in tqdm(zip(blocks, calls), total=len(blocks), desc="compressing blocks",
                                                    unit="block", disable=not progress):
            dense, compressed = sequential_block(block_name, block, targets, block_call, dense, compressed,
                                                 compress_group)
    inside = [name for blocks in stacks for name, _ in blocks]
    return {n: m for n, m in targets.items() if not any(n.startswith(b + ".") for b in inside)}


@torch.no_grad()
def sequential_block(block_name: str, block: nn.Module, targets: dict[str, nn.Module], calls: list,
                     dense: list[torch.Tensor] | None, compressed: list[torch.Tensor], compress_group,
                     output_side: bool = False):
    """Compress one block's targets group by group (see :func:`run_sequential`); ``dense`` None: no
    dense stream (the groups are then read off the compressed stream's first batch). With
    ``output_side``, ``compress_group(names, gram, cross, outputs, diagonal)`` gets the output Grams of
    the group's layers with out ≤ in, ``gram`` only where another layer needs it (else None), and the
    diagonal of the input's Gram.

    Returns:
        The block's (dense, compressed) output hidden states, one per batch: the next block's inputs.
    """
    members = {n: m for n, m in targets.items() if n.startswith(block_name + ".")}
    if dense is None:
        groups, dense_inputs, dense_next = _record_inputs(block, members, calls[:1], compressed[:1])[0], None, None
    else:
        groups, dense_inputs, dense_next = _record_inputs(block, members, calls, dense)
    for group in groups:
        modules = {name: members[name] for name in group}
        gram, cross, outputs, diagonal = _group_statistics(block, modules, calls, compressed,
                                                           dense_inputs[group[0]] if dense_inputs else None,
                                                           output_side)
        if output_side:
            compress_group(group, gram, cross, outputs, diagonal)
        else:
            compress_group(group, gram, cross)
    return dense_next, [call_block(block, call, h) for call, h in zip(calls, compressed)]
