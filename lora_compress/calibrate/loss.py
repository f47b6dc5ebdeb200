"""The calibration loss whose gradients weigh each layer's outputs: one place for every kind of model.

A causal LM's next-token loss comes from its LM head's inputs a block of the vocabulary at a time
(head_loss.py) where its logits are a plain linear map of them; other LMs (an encoder-decoder's decoder,
a head that soft-caps) use their logits. The labels are drawn from the model's own prediction at each
position (the true Fisher: its gradients' covariance is the curvature of the KL to the dense model,
where the text's own labels weigh the directions that predict this text; issue 17: SmolLM2, 20% cut
calibrated on a play, worst other domain 3.80× → 3.57× dense alone). Encoders (no loss of their own)
use ``rᵀh`` for a fixed random r on every floating output h, whose squared gradient is the Gauss–Newton
weight of an output-change error. Every draw comes from one generator seeded by the config's seed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .head_loss import next_token_loss, supports_chunked_loss
from .seq2seq import is_encoder_decoder, predictions


def model_loss(output, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The calibration loss of one batch from the model's output: an LM's next-token loss on labels drawn
    from its own prediction (summed over the predicted tokens), else rᵀh over the floating outputs."""
    logits = getattr(output, "logits", None)
    if logits is not None:
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


def chunked(model: nn.Module) -> bool:
    """Whether the loss is taken from the LM head's inputs a vocabulary block at a time (head_loss.py)."""
    return (not is_encoder_decoder(model) and getattr(model, "get_output_embeddings", lambda: None)() is not None
            and supports_chunked_loss(model))


def calibration_loss(model: nn.Module, ids: list[torch.Tensor], output_of: Callable, seed: int = 0) -> Callable:
    """``loss(batch, hidden)``: the calibration loss of batch ``batch`` (token ids ``ids[batch]``) from the last
    block's output ``hidden``, where ``output_of(batch, hidden, features)`` gives the model's output (with
    ``features``, the LM head's inputs in place of its logits). One generator, seeded by ``seed``, draws
    every label."""
    generator = torch.Generator().manual_seed(seed)
    if chunked(model):
        head = model.get_output_embeddings()
        return lambda batch, hidden: next_token_loss(output_of(batch, hidden, True).logits, head, ids[batch],
                                                     generator)
    return lambda batch, hidden: model_loss(output_of(batch, hidden, False), ids[batch].to(hidden.device), generator)
