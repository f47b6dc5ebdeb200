"""Calibration text → token batches → per-layer statistics, and the block-by-block runner.

Statistics are sums, never stored activations:

    gram[l]   = Σ_t x_t x_tᵀ          (in×in, float64)   inputs of layer l
    fisher[l] = Σ_t g_t g_tᵀ          (out×out, float32)  output-gradient second moments, g = ∂loss/∂y_t,
                                                          for layers with up to FULL_FISHER_MAX outputs;
                Σ_t g_t²              (out, float64)      their diagonal only, for wider layers

Once every token is in, each full F is shrunk towards its diagonal by the Ledoit–Wolf intensity
(``Statistics.shrink_fisher``): with few calibration tokens for a wide layer, the raw covariance
is mostly noise (SmolLM2 with 8×256 tokens, 40% cut: 123.6 alice29 perplexity unshrunk against
105.2 with the diagonal alone; 95.9 shrunk).

Causal LMs use their next-token loss; encoders (no loss of their own) use ``rᵀh`` for a fixed
random r on every floating output h, whose squared gradient is the Gauss–Newton weight of an
output-change error. Layers that share an input tensor (q/k/v, gate/up) share one Gram.

The sequential runner compresses one transformer block at a time. It keeps two streams of
hidden states: the dense model's and the compressed model's. Inside a block, layers that read
the same tensor form a group (q/k/v; o; gate/up; down), compressed in call order, each group
seeing the inputs that the already compressed groups produce.
"""
from __future__ import annotations

import inspect
import resource
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LoraCompressError

BATCH_SAMPLES = 4  # sequences per forward while calibrating (bounds activation memory)
FULL_FISHER_MAX = 2048  # widest layer output whose full gradient covariance is kept (out² floats); else its diagonal


def calibration_tokens(tokenizer, text: str, samples: int, length: int) -> torch.Tensor:
    """``samples`` sequences of ``length`` tokens, taken evenly spread over ``text``.

    Returns:
        Token ids, (samples, length).

    Raises:
        LoraCompressError: the text holds fewer than samples × length tokens.
    """
    ids = tokenizer(text, return_tensors="pt", truncation=False)["input_ids"][0]  # (N,)
    needed = samples * length
    if len(ids) < needed:
        raise LoraCompressError(f"calibration text has {len(ids):,} tokens but --calib-samples {samples} × "
                                f"--calib-len {length} needs {needed:,}; pass a longer text or fewer/shorter samples")
    starts = torch.linspace(0, len(ids) - length, samples).long()
    return torch.stack([ids[s: s + length] for s in starts.tolist()])  # (samples, length)


def batches(tokens: torch.Tensor, size: int = BATCH_SAMPLES) -> list[torch.Tensor]:
    """Rows of ``tokens`` in chunks of ``size``."""
    return list(tokens.split(size))


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _input(args, kwargs) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()  # (tokens, features)


def _add(store: dict, key, value: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
    store[key] = store[key] + value.to(dtype) if key in store else value.to(dtype)


def _add_gradient_moments(stats: "Statistics", name: str, gradient: torch.Tensor) -> None:
    """Add Σ_t g_t g_tᵀ (float32: out² floats) and its fourth moments to ``stats``, or Σ_t g_t² past
    FULL_FISHER_MAX outputs."""
    flat = _flat(gradient)  # (tokens, out)
    if flat.shape[1] > FULL_FISHER_MAX:
        _add(stats.fisher, name, flat.pow(2).sum(0))
        return
    _add(stats.fisher, name, flat.T @ flat, torch.float32)
    squares = flat.double().pow(2)  # (tokens, out)
    _add(stats.fourth, name, torch.stack([squares.sum(1).pow(2).sum(), squares.pow(2).sum()]))


def shrunk_covariance(total: torch.Tensor, fourth: torch.Tensor, count: int) -> torch.Tensor:
    """(1 − α)·Σ + α·diag(Σ) for a sum Σ = Σ_t g_t g_tᵀ over ``count`` samples, with the Ledoit–Wolf
    intensity α for a diagonal target; ``fourth`` = [Σ_t ‖g_t‖⁴, Σ_t Σ_i g_ti⁴]."""
    if count < 2:
        return total
    mean = total.double() / count  # S, (out, out)
    off_square = mean.pow(2).sum() - mean.diagonal().pow(2).sum()  # Σ_{i≠j} s_ij²
    off_fourth = (fourth[0] - fourth[1]) / count  # mean over t of Σ_{i≠j} (g_ti·g_tj)²
    variance = (off_fourth - off_square).clamp_min(0) / (count - 1)  # Σ_{i≠j} Var(s_ij)
    alpha = float((variance / off_square.clamp_min(1e-300)).clamp(0, 1))
    shrunk = total * (1 - alpha)
    shrunk.diagonal().copy_(total.diagonal())
    return shrunk


@dataclass
class Statistics:
    """Per-layer sums gathered over the calibration tokens."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)  # owner name → (in, in)
    owner: dict[str, str] = field(default_factory=dict)  # layer name → name whose Gram it shares
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (out, out), or (out,) when wide
    fourth: dict[str, torch.Tensor] = field(default_factory=dict)  # name → [Σ_t ‖g_t‖⁴, Σ_t Σ_i g_ti⁴] (full F)
    tokens: int = 0

    def gram(self, name: str) -> torch.Tensor:
        """The (in, in) Gram of the inputs of layer ``name``."""
        return self.grams[self.owner[name]]

    def shrink_fisher(self) -> None:
        """Shrink each full gradient covariance F towards its diagonal, F ← (1 − α)·F + α·diag(F), once
        every token is in, with the Ledoit–Wolf intensity for that target (Schäfer & Strimmer 2005):
        α = Σ_{i≠j} Var(f_ij) / Σ_{i≠j} f_ij², from the fourth moments. Few calibration tokens for a
        wide layer make F noisy and α large; many make α small."""
        for name, moments in self.fourth.items():
            self.fisher[name] = shrunk_covariance(self.fisher[name], moments, self.tokens)
        self.fourth = {}


def forward(model: nn.Module, ids: torch.Tensor, **options):
    """The model on ``ids`` without a KV cache (decoders) — calibration never generates."""
    if "use_cache" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, use_cache=False, **options)
    return model(input_ids=ids, **options)


def model_loss(output, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The calibration loss of one batch: next-token loss (causal LMs), else rᵀh over the floating outputs."""
    logits = getattr(output, "logits", None)
    if logits is not None:  # causal LM: the next-token loss, summed over tokens
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    loss = 0.0
    for value in output.values():  # encoder: random projections of every floating output
        if torch.is_tensor(value) and value.is_floating_point() and value.requires_grad:
            loss = loss + (value * torch.randn(value.shape, generator=generator).to(value)).sum()
    return loss


class GramHooks:
    """Forward hooks summing each layer's input Gram; consecutive layers reading one tensor share it."""

    def __init__(self, stats: Statistics, modules: dict[str, nn.Module], fisher: bool = False):
        self.stats, self.fisher, self.last = stats, fisher, (None, None)
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def forward_hook(module, args, output):
            x = args[0]
            owner = self.last[1] if x is self.last[0] else name
            self.last = (x, owner)
            self.stats.owner[name] = owner
            if owner == name:
                flat = _flat(x.detach())  # (tokens, in)
                _add(self.stats.grams, name, flat.T @ flat)
            if self.fisher and output.requires_grad:
                output.register_hook(lambda g: _add_gradient_moments(self.stats, name, g))
        return forward_hook

    def remove(self) -> None:
        self.last = (None, None)
        for handle in self.handles:
            handle.remove()


def collect_statistics(model: nn.Module, tokens: torch.Tensor, targets: dict[str, nn.Module],
                       fisher: bool = True, progress: bool = True) -> Statistics:
    """Input Grams (and output-gradient second moments if ``fisher``) of every target layer.

    One forward (and, for ``fisher``, backward) pass of the whole model per batch of sequences.
    """
    stats, generator = Statistics(), torch.Generator().manual_seed(0)
    hooks = GramHooks(stats, targets, fisher)
    leaf = model.get_input_embeddings().register_forward_hook(
        lambda m, a, out: out.detach().requires_grad_(True)) if fisher else None
    wanted = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)  # the backward needs activation gradients only, not 135M+ weight gradients
    try:
        for ids in tqdm(batches(tokens), desc="calibrating", unit="batch", disable=not progress):
            with torch.set_grad_enabled(fisher):
                output = forward(model, ids)
                if fisher:
                    model_loss(output, ids, generator).backward()
            hooks.last = (None, None)
            stats.tokens += ids.numel()
    finally:
        hooks.remove()
        if leaf is not None:
            leaf.remove()
        for param, flag in wanted.items():
            param.requires_grad_(flag)
    stats.shrink_fisher()
    return stats


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are seen."""


def find_blocks(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """The repeated transformer blocks: the ModuleList whose children hold the most targets."""
    best, held_best = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            held = sum(1 for t in targets if t.startswith(name + "."))
            if held > held_best:
                best, held_best = name, held
    if best is None:
        return []
    return [(f"{best}.{i}", block) for i, block in enumerate(model.get_submodule(best))]


@torch.no_grad()
def block_inputs(model: nn.Module, block: nn.Module, tokens: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives, one pair per calibration batch."""
    captured = []

    def pre_hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        _forward_until_stopped(model, tokens)
    finally:
        handle.remove()
    return captured


def _forward_until_stopped(model: nn.Module, tokens: torch.Tensor) -> None:
    """The model on every calibration batch, each forward cut short where a hook raises _Stop."""
    for ids in batches(tokens):
        try:
            forward(model, ids)
        except _Stop:
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
                raise _Stop
            return (_input(args, kwargs),) if tuple_output else _input(args, kwargs)
        return record

    for index, block in enumerate(blocks):
        block.forward = recorder(index)
    try:
        _forward_until_stopped(model, tokens)
    finally:
        for block in blocks:
            del block.forward
    return calls


def block_hidden(calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    """The hidden states of captured block calls (see :func:`block_calls`), one per batch."""
    return [_input(*call) for call in calls]


def call_block(block: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor:
    """``block`` on ``hidden`` with the other arguments of a captured call; its output hidden states."""
    args, kwargs = call
    if args:
        output = block(hidden, *args[1:], **kwargs)
    else:
        output = block(**{**kwargs, "hidden_states": hidden})
    return output[0] if isinstance(output, tuple) else output  # (B, T, C)


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


def _group_statistics(block, owner_module, calls, hidden, dense_inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gram of the compressed stream's inputs to a group, and its cross-Gram with the dense inputs
    (None without ``dense_inputs``)."""
    sums, batch = {}, {"index": 0}

    def hook(module, args, output):
        x_c = _flat(args[0])  # (tokens, in)
        _add(sums, "gram", x_c.T @ x_c)
        if dense_inputs is not None:
            _add(sums, "cross", _flat(dense_inputs[batch["index"]]).T @ x_c)
        raise _Stop

    handle = owner_module.register_forward_hook(hook)
    try:
        for index, (call, h) in enumerate(zip(calls, hidden)):
            batch["index"] = index
            try:
                call_block(block, call, h)
            except _Stop:
                pass
    finally:
        handle.remove()
    return sums["gram"], sums.get("cross")


@torch.no_grad()
def run_sequential(model: nn.Module, tokens: torch.Tensor, targets: dict[str, nn.Module], compress_group,
                   progress: bool = True, dense_stream: bool = True) -> dict[str, nn.Module]:
    """Compress block by block, feeding each group the inputs the compressed model produces.

    ``compress_group(names, gram, cross)`` factors the layers ``names`` (which share one input)
    given ``gram`` = X_cᵀX_c of the compressed stream's inputs and ``cross`` = X_dᵀX_c with the
    dense stream's inputs, both (in, in) float64; without ``dense_stream`` the dense model is not
    run alongside (one block pass fewer per block) and ``cross`` is None.

    Returns:
        The targets outside the blocks (e.g. a pooler), left for the caller.
    """
    blocks = find_blocks(model, targets)
    if not blocks:
        return dict(targets)
    modules = [block for _, block in blocks]
    calls = block_calls(model, modules, tokens, returns_tuple(model, modules[0], tokens))
    compressed = block_hidden(calls[0])
    dense = compressed if dense_stream else None
    for (block_name, block), block_call in tqdm(zip(blocks, calls), total=len(blocks), desc="compressing blocks",
                                                unit="block", disable=not progress):
        dense, compressed = sequential_block(block_name, block, targets, block_call, dense, compressed,
                                             compress_group)
    return {n: m for n, m in targets.items() if not any(n.startswith(b + ".") for b, _ in blocks)}


@torch.no_grad()
def sequential_block(block_name: str, block: nn.Module, targets: dict[str, nn.Module], calls: list,
                     dense: list[torch.Tensor] | None, compressed: list[torch.Tensor], compress_group):
    """Compress one block's targets group by group (see :func:`run_sequential`); ``dense`` None: no
    dense stream (the groups are then read off the compressed stream's first batch).

    Returns:
        The block's (dense, compressed) output hidden states, one per batch: the next block's inputs.
    """
    members = {n: m for n, m in targets.items() if n.startswith(block_name + ".")}
    if dense is None:
        groups, dense_inputs, dense_next = _record_inputs(block, members, calls[:1], compressed[:1])[0], None, None
    else:
        groups, dense_inputs, dense_next = _record_inputs(block, members, calls, dense)
    for group in groups:
        owner = block.get_submodule(group[0][len(block_name) + 1:])
        gram, cross = _group_statistics(block, owner, calls, compressed,
                                        dense_inputs[group[0]] if dense_inputs else None)
        compress_group(group, gram, cross)
    return dense_next, [call_block(block, call, h) for call, h in zip(calls, compressed)]


def read_calibration_text(source: str) -> str:
    """Calibration text from a file (plain text or .jsonl), or a ``datasets`` name when available.

    Raises:
        LoraCompressError: missing, empty or non-UTF-8 file, and no such dataset.
    """
    from pathlib import Path

    from .text import read_text

    if Path(source).exists() or not _datasets_available():
        return read_text(source, "--calib")
    try:
        from datasets import load_dataset

        rows = load_dataset(source, split="train")
        return "\n\n".join(str(t) for t in rows["text"] if str(t).strip())
    except Exception:  # datasets raises many types; all mean "not available here"
        return read_text(source, "--calib")


def _datasets_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is not None
