"""KL(teacher ‖ student) of next-token distributions, straight from the LM head's inputs.

    s = h_s·Wᵀ + b,  t = h_t·Wᵀ + b          (rows × vocab logits, float32)
    KL = mean over rows of Σ_v p_v (t_v − s_v) + logsumexp(s) − logsumexp(t),   p = softmax(t)
    ∂KL/∂h_s = (softmax(s) − p)·W / rows

The logits are made a block of rows at a time and the gradient with respect to h_s is computed in
the forward pass (the head is frozen while healing), so no rows × vocab tensor outlives its block,
and each logit is exponentiated once. log_softmax + kl_div over all rows made and freed several
(1,024 × 49,152) float32 tensors a step; healing SmolLM2 went from 2.9 to 2.0 s a step with this
(benchmarks/heal.md). tests/test_heal.py checks loss and gradient against kl_div.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_ELEMENTS = 1 << 24  # logits per block of rows (64 MiB in float32)


def linear_kl(hidden: torch.Tensor, teacher_hidden: torch.Tensor, head: nn.Module, teacher_head: nn.Module,
              grad_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean over rows of KL(softmax(teacher_head(teacher_hidden)) ‖ softmax(head(hidden))).

    Args:
        hidden: the student's LM-head inputs, (N, C); the gradient flows to it alone.
        teacher_hidden: the teacher's, (N, C).
        head, teacher_head: frozen linear heads (``weight`` (V, C), optional ``bias``).
        grad_dtype: precision of the gradient's (N, V)·(V, C) product (bfloat16 where the body's
            backward runs in bfloat16 anyway); logits and loss are always float32.

    Returns:
        A scalar: the KL per row (``reduction="batchmean"``).
    """
    wanted = torch.is_grad_enabled() and hidden.requires_grad  # forward runs with grad mode off: ask here
    return _LinearKL.apply(hidden.float(), teacher_hidden.float(), *_weights(head), *_weights(teacher_head),
                           grad_dtype if wanted else None)


def _weights(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    bias = getattr(head, "bias", None)
    return head.weight.detach().float(), None if bias is None else bias.detach().float()


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, grad_dtype):
        rows, wanted = hidden.shape[0], grad_dtype is not None
        block = max(1, BLOCK_ELEMENTS // weight.shape[0])
        total, grad = hidden.new_zeros(()), torch.empty_like(hidden)  # grad: (N, C)
        low_weight = weight.to(grad_dtype) if wanted else None
        for start in range(0, rows, block):
            part = slice(start, start + block)
            s = F.linear(hidden[part], weight, bias)  # (n, V)
            t = F.linear(teacher_hidden[part], teacher_weight, teacher_bias)  # (n, V)
            q, log_norm_s = _softmax(s)
            p, log_norm_t = _softmax(t)
            total += torch.linalg.vecdot(p, t.sub_(s)).sum() + (log_norm_s - log_norm_t).sum()
            if wanted:
                grad[part] = q.sub_(p).to(grad_dtype) @ low_weight  # (n, C)
        ctx.save_for_backward(grad.div_(rows))
        return total / rows

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None, None, None


def _softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, logsumexp) of each row with one exp per entry; ``logits`` is left unchanged."""
    peak = logits.amax(-1, keepdim=True)
    exp = (logits - peak).exp_()
    norm = exp.sum(-1, keepdim=True)
    return exp.div_(norm), (peak + norm.log()).squeeze(-1)
