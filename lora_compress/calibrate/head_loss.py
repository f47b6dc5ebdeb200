"""A causal LM's calibration loss from its LM head's inputs, a block of the vocabulary at a time.

    loss = Σ_t logsumexp_v(h_t·W_vᵀ + b_v) − (h_t·W_yᵀ + b_y)        y = the next token at t
    ∂loss/∂h_t = Σ_v softmax_v(t)·W_v − W_y

The softmax is taken online over vocabulary blocks (a running max m and sum z per row); the
gradient's numerator Σ_v e^{s_v − m}·W_v is rescaled by e^{m_old − m_new} whenever m grows, so each
logit is made once and the gradient comes out of the forward pass. With a generator, y is drawn from
the model's own prediction instead of read from the text (the true Fisher, calibrate/statistics.model_loss),
by the Gumbel-max trick in the same pass: y = argmax_v (s_v + g_v), g_v ~ Gumbel(0, 1). W is cast to float32 one
vocabulary block at a time, so a bfloat16 head never runs a bf16 matmul and never exists whole in
float32: Qwen2-1.5B's 151,936 × 1,536 head makes 0.6 GB of float32 logits per 1,024 tokens, here a
block of rows × vocabulary is 64 MiB.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_ELEMENTS = 1 << 24  # logits per (rows × vocabulary) block: 64 MiB in float32
VOCAB_BLOCK = 1 << 15  # vocabulary rows of W cast to float32 at a time


def supports_chunked_loss(model: nn.Module) -> bool:
    """True when the model's logits are a plain linear map of its head's inputs (no soft-capping or
    scaling after lm_head), so :func:`next_token_loss` gives its next-token loss."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    return (type(head) is nn.Linear and not getattr(config, "final_logit_softcapping", None)
            and getattr(config, "logits_scaling", 1) in (1, None))


def next_token_loss(features: torch.Tensor, head: nn.Linear, ids: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Σ over predicted tokens of −log p(y), from the head's inputs ``features`` (B, T, C); y is the next
    token of ``ids``, or, with ``generator``, drawn from the model's own prediction. Differentiable with
    respect to ``features`` (the head is frozen)."""
    hidden = features[:, :-1].reshape(-1, features.shape[-1])  # (N, C)
    targets = ids[:, 1:].reshape(-1).to(features.device)  # (N,)
    bias = None if head.bias is None else head.bias.detach()
    return _LinearCrossEntropy.apply(hidden, head.weight.detach(), bias, targets, generator)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, generator):
        h = hidden.float()  # (N, C)
        rows, vocab = h.shape[0], weight.shape[0]
        peak = h.new_full((rows,), -torch.inf)
        total = h.new_zeros(rows)
        numerator = torch.zeros_like(h)  # Σ_v e^{s_v − peak}·W_v, (N, C)
        best = h.new_full((rows,), -torch.inf)  # the largest s_v + g_v so far (drawing y)
        if generator is not None:
            targets = torch.zeros_like(targets)
        step = max(1, BLOCK_ELEMENTS // min(VOCAB_BLOCK, vocab))
        for start in range(0, vocab, VOCAB_BLOCK):  # the head may stay on the CPU while the rows are on a GPU
            block = weight[start: start + VOCAB_BLOCK].to(h.device).float()  # (v, C)
            block_bias = None if bias is None else bias[start: start + VOCAB_BLOCK].to(h.device).float()
            for first in range(0, rows, step):
                part = slice(first, first + step)
                logits = F.linear(h[part], block, block_bias)  # (n, v)
                if generator is not None:
                    _draw(logits, start, part, best, targets, generator)
                new_peak = torch.maximum(peak[part], logits.amax(1))
                rescale = (peak[part] - new_peak).exp()
                exp = logits.sub_(new_peak.unsqueeze(1)).exp_()
                total[part] = total[part] * rescale + exp.sum(1)
                numerator[part] = numerator[part] * rescale.unsqueeze(1) + exp @ block
                peak[part] = new_peak
        rows_of = targets.to(weight.device)
        chosen = weight[rows_of].to(h.device).float()  # (N, C)
        target_logits = (h * chosen).sum(1) + (0 if bias is None else bias[rows_of].to(h.device).float())
        loss = (peak + total.log() - target_logits).sum()
        ctx.save_for_backward((numerator / total.unsqueeze(1) - chosen).to(hidden.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None


def _draw(logits: torch.Tensor, start: int, part: slice, best: torch.Tensor, targets: torch.Tensor,
          generator: torch.Generator) -> None:
    """Gumbel-max over one (rows × vocabulary) block: keep each row's best s_v + g_v and its token."""
    uniform = torch.rand(logits.shape, generator=generator).to(logits.device).clamp_(1e-20, 1.0)
    scores = logits - uniform.log_().neg_().log_()  # s + g, g = −log(−log u)
    value, index = scores.max(1)
    better = value > best[part]
    best[part] = torch.where(better, value, best[part])
    targets[part] = torch.where(better, index + start, targets[part])
