"""Encoder-decoder models (T5, BART) on calibration and evaluation text: the decoder is fed too.

    encoder  ◀── ids                       (t₁ … t_T)
    decoder  ◀── ids shifted right          (start, t₁ … t_{T-1}), as the models' own training does
    logits[t] predicts ids[t]               (a causal LM's logits[t] predicts ids[t+1])

so the loss (and evaluate's perplexity) is over the decoder's predictions of the text the encoder
read. The closed loop compresses the encoder's blocks and then the decoder's (calibrate/closed_loop.py),
so the decoder is fitted on the compressed encoder's outputs.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LoraCompressError


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for a model with an encoder and a decoder (T5, BART, …)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_seq2seq_lm(model: nn.Module) -> bool:
    """True for an encoder-decoder with an LM head (T5ForConditionalGeneration, BartForConditionalGeneration)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.values())
    return is_encoder_decoder(model) and type(model).__name__ in names


def decoder_input_ids(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``ids`` shifted right by the model's own rule (its start token first), (B, T).

    Raises:
        LoraCompressError: the model's config names no decoder start token.
    """
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=ids)
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        raise LoraCompressError(f"{type(model).__name__} names no decoder_start_token_id in its config.json; "
                                f"set it there to calibrate or evaluate this encoder-decoder")
    shifted = ids.new_full(ids.shape, start)
    shifted[:, 1:] = ids[:, :-1]
    return shifted


def model_inputs(model: nn.Module, ids: torch.Tensor) -> dict:
    """The keyword inputs of one forward on token ids: ``input_ids``, and the decoder's for an encoder-decoder."""
    if is_encoder_decoder(model):
        return {"input_ids": ids, "decoder_input_ids": decoder_input_ids(model, ids)}
    return {"input_ids": ids}


def predictions(logits: torch.Tensor, ids: torch.Tensor, seq2seq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of the predicted tokens, flat: (N, V) and (N,). A causal LM predicts the next
    token; an encoder-decoder's decoder predicts the token at its own position (its input is shifted)."""
    if seq2seq:
        return logits.flatten(0, -2), ids.flatten()
    return logits[..., :-1, :].flatten(0, -2), ids[..., 1:].flatten()


def token_embeddings(model: nn.Module) -> list[nn.Module]:
    """Every embedding module that looks up input tokens: the input embedding and those sharing its
    weight (BART's encoder and decoder each call their own module on one shared table)."""
    table = model.get_input_embeddings()
    return [m for m in model.modules() if m is table or (isinstance(m, nn.Embedding) and m.weight is table.weight)]


def encoder_decoder_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` of the encoder and then the decoder (empty for other models)."""
    if not is_encoder_decoder(model):
        return []
    names = {id(module): name for name, module in model.named_modules()}
    return [(names[id(part)], part) for part in (model.get_encoder(), model.get_decoder())]


def encoder_outputs(hidden: list[torch.Tensor] | None) -> list | None:
    """Per batch, the encoder's last hidden states as the ``encoder_outputs`` a seq2seq model accepts."""
    if hidden is None:
        return None
    from transformers.modeling_outputs import BaseModelOutput

    return [BaseModelOutput(last_hidden_state=h) for h in hidden]
