"""Per-layer calibration statistics: sums over the calibration tokens, never stored activations.

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
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.layers import dense_weight
from ..core.whitening import output_side as _output_side
from .forward import forward
from .seq2seq import predictions, token_embeddings
from .timing import StageTimer
from .tokens import batches

FULL_FISHER_MAX = 2048  # widest layer output whose full gradient covariance is kept (out² floats); else its diagonal


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def flat_features(x: torch.Tensor) -> torch.Tensor:
    """(…, features) → (tokens, features), float32."""
    return x.reshape(-1, x.shape[-1]).float()  # (tokens, features)


def accumulate(store: dict, key, value: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
    """store[key] += value, in ``dtype`` (float64 by default: Gram sums over many tokens)."""
    store[key] = store[key] + value.to(dtype) if key in store else value.to(dtype)


def _add_gradient_moments(stats: "Statistics", name: str, gradient: torch.Tensor, full_fisher_max: int) -> None:
    """Add Σ_t g_t g_tᵀ (float32: out² floats) and its fourth moments to ``stats``, or Σ_t g_t² past
    ``full_fisher_max`` outputs."""
    flat = flat_features(gradient)  # (tokens, out)
    if flat.shape[1] > full_fisher_max:
        accumulate(stats.fisher, name, flat.pow(2).sum(0))
        return
    accumulate(stats.fisher, name, flat.T @ flat, torch.float32)
    squares = flat.double().pow(2)  # (tokens, out)
    accumulate(stats.fourth, name, torch.stack([squares.sum(1).pow(2).sum(), squares.pow(2).sum()]))


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
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)  # name → Σ (y−b)(y−b)ᵀ, (out, out): output side
    energy: dict[str, float] = field(default_factory=dict)  # owner name → Σ_t ‖x_t‖² (the trace of its Gram)
    diagonals: dict[str, torch.Tensor] = field(default_factory=dict)  # owner name → Σ_t x_t², (in,): diag of its Gram
    owner: dict[str, str] = field(default_factory=dict)  # layer name → name whose Gram it shares
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (out, out), or (out,) when wide
    fourth: dict[str, torch.Tensor] = field(default_factory=dict)  # name → [Σ_t ‖g_t‖⁴, Σ_t Σ_i g_ti⁴] (full F)
    rows: dict[str, int] = field(default_factory=dict)  # owner name → rows summed (an expert: tokens routed to it)
    tokens: int = 0

    def gram(self, name: str) -> torch.Tensor:
        """The (in, in) Gram of the inputs of layer ``name``."""
        return self.grams[self.owner[name]]

    def input_gram(self, name: str) -> torch.Tensor | None:
        """The input Gram of ``name``, or None for a layer summed on its output side."""
        return None if name in self.outputs else self.grams.get(self.owner.get(name, name))

    def input_diagonal(self, name: str) -> torch.Tensor | None:
        """The diagonal of the input Gram of ``name`` (summed on either side)."""
        return self.diagonals.get(self.owner.get(name, name))

    def shrink_fisher(self) -> None:
        """Shrink each full gradient covariance F towards its diagonal, F ← (1 − α)·F + α·diag(F), once
        every token is in, with the Ledoit–Wolf intensity for that target (Schäfer & Strimmer 2005):
        α = Σ_{i≠j} Var(f_ij) / Σ_{i≠j} f_ij², from the fourth moments. Few calibration tokens for a
        wide layer make F noisy and α large; many make α small."""
        for name, moments in self.fourth.items():
            self.fisher[name] = shrunk_covariance(self.fisher[name], moments, self.tokens)
        self.fourth = {}


def model_loss(output, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The calibration loss of one batch: for an LM (causal, or an encoder-decoder's decoder:
    calibrate/seq2seq.py) the next-token loss on labels drawn from the model's own prediction at each
    position (the true Fisher: its gradients' covariance is the curvature of the KL to the dense model,
    where the text's own labels weigh the directions that predict this text; issue 17: SmolLM2, 20% cut
    calibrated on a play, worst other domain 3.80× → 3.57× dense alone); else rᵀh over the floating outputs."""
    logits = getattr(output, "logits", None)
    if logits is not None:  # summed over the predicted tokens
        seq2seq = getattr(output, "encoder_last_hidden_state", None) is not None
        predicted, _ = predictions(logits.float(), ids, seq2seq)  # (N, V)
        probabilities = predicted.detach().softmax(-1).cpu()
        labels = torch.multinomial(probabilities, 1, generator=generator).squeeze(1).to(predicted.device)
        return nn.functional.cross_entropy(predicted, labels, reduction="sum")
    loss = 0.0
    for value in output.values():  # encoder: random projections of every floating output
        if torch.is_tensor(value) and value.is_floating_point() and value.requires_grad:
            loss = loss + (value * torch.randn(value.shape, generator=generator).to(value)).sum()
    return loss


def output_features(module: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """W·x of a linear layer's output y = W·x + b: (tokens, out), float32."""
    flat = flat_features(output.detach())
    bias = getattr(module, "bias", None)
    return flat if bias is None else flat - bias.detach().float()


class GramHooks:
    """Forward hooks summing each layer's input Gram; consecutive layers reading one tensor share it.

    With ``output_side``, a layer with out ≤ in sums the Gram of its outputs W·x instead (out×out,
    core/whitening.output_side): all the output route needs, and much smaller for a wide layer (a
    down_proj with in = 8,960 sums 1,536² floats instead of 8,960², 34× fewer multiply-adds).
    """

    def __init__(self, stats: Statistics, modules: dict[str, nn.Module], fisher: bool = False,
                 full_fisher_max: int = FULL_FISHER_MAX, timer: StageTimer | None = None, output_side: bool = False):
        self.stats, self.fisher, self.full_fisher_max = stats, fisher, full_fisher_max
        self.timer = timer
        self.on_output = {name for name, module in modules.items()
                          if output_side and _output_side(tuple(dense_weight(module).shape))}
        self.last = (None, None, False)  # (input tensor, the layer owning its sums, its Gram added)
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def new_batch(self) -> None:
        """Forget the last input seen: the next batch's tensors are new ones."""
        self.last = (None, None, False)

    def _hook(self, name):
        def forward_hook(module, args, output):
            start = time.perf_counter()
            x = args[0]
            shared = x is self.last[0]
            owner, counted = (self.last[1], self.last[2]) if shared else (name, False)
            self.stats.owner[name] = owner
            flat = None
            if not shared:
                flat = flat_features(x.detach())  # (tokens, in)
                self.stats.rows[name] = self.stats.rows.get(name, 0) + flat.shape[0]
                squares = flat.double().pow(2).sum(0)  # (in,)
                accumulate(self.stats.diagonals, name, squares)
                self.stats.energy[name] = self.stats.energy.get(name, 0.0) + float(squares.sum())
            if name in self.on_output:
                features = output_features(module, output)  # (tokens, out)
                accumulate(self.stats.outputs, name, features.T @ features)
            elif not counted:  # the input's Gram, once per batch for the layers sharing it
                flat = flat_features(x.detach()) if flat is None else flat
                accumulate(self.stats.grams, owner, flat.T @ flat)
                counted = True
            self.last = (x, owner, counted)
            if self.fisher and output.requires_grad:
                output.register_hook(lambda g: self._timed(_add_gradient_moments, self.stats, name, g,
                                                           self.full_fisher_max))
            self._record(start)
        return forward_hook

    def _timed(self, function, *args) -> None:
        start = time.perf_counter()
        function(*args)
        self._record(start)

    def _record(self, start: float) -> None:
        if self.timer is not None:
            self.timer.record("statistics", time.perf_counter() - start)

    def remove(self) -> None:
        self.new_batch()
        for handle in self.handles:
            handle.remove()


def collect_statistics(model: nn.Module, tokens: torch.Tensor, targets: dict[str, nn.Module],
                       fisher: bool = True, progress: bool = True, full_fisher_max: int = FULL_FISHER_MAX,
                       output_side: bool = False) -> Statistics:
    """Input Grams (and output-gradient second moments if ``fisher``) of every target layer.

    One forward (and, for ``fisher``, backward) pass of the whole model per batch of sequences; layers
    with more than ``full_fisher_max`` outputs keep the diagonal of their gradient covariance only.
    """
    stats, generator = Statistics(), torch.Generator().manual_seed(0)
    hooks = GramHooks(stats, targets, fisher, full_fisher_max, output_side=output_side)
    leaves = [module.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
              for module in token_embeddings(model)] if fisher else []
    wanted = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)  # the backward needs activation gradients only, not 135M+ weight gradients
    try:
        for ids in tqdm(batches(tokens), desc="calibrating", unit="batch", disable=not progress):
            with torch.set_grad_enabled(fisher):
                output = forward(model, ids)
                if fisher:
                    model_loss(output, ids, generator).backward()
            hooks.new_batch()
            stats.tokens += ids.numel()
    finally:
        hooks.remove()
        for leaf in leaves:
            leaf.remove()
        for param, flag in wanted.items():
            param.requires_grad_(flag)
    stats.shrink_fisher()
    return stats


