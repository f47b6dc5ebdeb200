"""Dense vs compressed on real text: drift, perplexity, counts, sizes and forward time.

Causal LMs: text → the first ``max_tokens`` tokens, cut into non-overlapping ``window``-token
windows. Perplexity uses labels = input ids (next-token NLL over each window). Drift: relative
Frobenius error of the logits, KL(dense ‖ compressed) of next-token distributions (mean per
token), top-1 agreement.
Encoder-decoders with an LM head (T5, BART): the same windows go to the encoder, and shifted right
to the decoder, as their training does (calibrate/seq2seq.py); perplexity and drift are over the
decoder's predictions of the window's tokens.
Encoders: paragraphs of the text → mean-pooled, L2-normalised embeddings; drift: cosine
similarity of the embeddings and relative error of the last hidden states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..calibrate.timing import StageTimer
from ..calibrate.seq2seq import is_encoder_decoder, is_seq2seq_lm, model_inputs, predictions
from ..core.counting import COUNTED, targeted_params, total_params
from ..errors import LoraCompressError
from ..storage.checkpoint import is_causal_lm
from ..storage.text import paragraphs


@dataclass(frozen=True)
class EvalConfig:
    """How much text to use."""

    max_tokens: int = 4096  # causal LMs: tokens of --text used
    window: int = 1024  # causal LMs: tokens per forward
    max_paragraphs: int = 256  # encoders: paragraphs embedded
    max_length: int = 128  # encoders: tokens per paragraph
    batch_size: int = 16  # encoders: paragraphs per forward


def count_summary(dense: nn.Module, compressed: nn.Module, targets) -> dict:
    """Parameter counts of both models, whole and targeted, with what is counted."""
    counts = {"dense_total": total_params(dense), "compressed_total": total_params(compressed),
              "dense_targeted": targeted_params(dense, targets),
              "compressed_targeted": targeted_params(compressed, targets), "counted": COUNTED}
    counts["ratio_total"] = counts["compressed_total"] / counts["dense_total"]
    counts["ratio_targeted"] = counts["compressed_targeted"] / counts["dense_targeted"]
    return counts


@torch.no_grad()
def evaluate(dense: nn.Module, compressed: nn.Module, tokenizer, text: str, targets,
             config: EvalConfig = EvalConfig(), progress: bool = True) -> dict:
    """All figures comparing ``compressed`` to ``dense`` on ``text``.

    Args:
        dense, compressed: the two models (same architecture, same tokenizer).
        tokenizer: their tokenizer.
        text: real text, e.g. a book.
        targets: names of the targeted layers (from the manifest).

    Returns:
        A JSON-able dict: ``kind``, ``params``, ``drift``, ``perplexity`` (causal LMs),
        ``seconds`` (forward wall time of each model).

    Example:
        >>> figures = evaluate(dense, load("out"), tokenizer, text, list(read_manifest("out").layers))
        >>> figures["perplexity"]["compressed"]
    """
    if tokenizer is None:
        raise LoraCompressError("the model folder has no tokenizer; copy its tokenizer files next to config.json")
    timer = StageTimer()
    if is_causal_lm(dense) or is_seq2seq_lm(dense):
        kind = "seq2seq" if is_seq2seq_lm(dense) else "causal-lm"
        figures = {"kind": kind, **_predictions(dense, compressed, tokenizer, text, config, timer, progress)}
    elif is_encoder_decoder(dense):
        raise LoraCompressError(f"evaluate scores an encoder-decoder by its decoder's predictions, and "
                                f"{type(dense).__name__} has no LM head; evaluate a ...ForConditionalGeneration "
                                f"checkpoint (compress, load and export work on this one)")
    else:
        figures = {"kind": "encoder", **_encoder(dense, compressed, tokenizer, text, config, timer, progress)}
    figures["params"] = count_summary(dense, compressed, targets)
    figures["seconds"] = {"dense": 0.0, "compressed": 0.0, **timer.seconds}
    return figures


def fit_context(model: nn.Module, tokens: int) -> int:
    """``tokens``, capped at the model's position limit where its config states one."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(tokens, limit) if limit else tokens


def _windows(tokenizer, text: str, config: EvalConfig, window: int) -> list[torch.Tensor]:
    """Non-overlapping ``window``-token windows of the first max_tokens ids."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0][: config.max_tokens]
    if len(ids) < 2:
        raise LoraCompressError("--text holds fewer than 2 tokens; pass a longer text")
    return [ids[i: i + window].unsqueeze(0) for i in range(0, len(ids), window) if len(ids[i: i + window]) >= 2]


def _predictions(dense, compressed, tokenizer, text, config, timer, progress) -> dict:
    """Perplexity and drift over the predicted tokens: the next token (causal LMs), the decoder's (encoder-decoders)."""
    sums = {"nll_dense": 0.0, "nll_compressed": 0.0, "kl": 0.0, "agree": 0, "tokens": 0, "predicted": 0,
            "diff_sq": 0.0, "ref_sq": 0.0}
    windows = _windows(tokenizer, text, config, fit_context(dense, config.window))
    seq2seq = is_encoder_decoder(dense)
    for ids in tqdm(windows, desc="evaluating", unit="window", disable=not progress):
        with timer.stage("dense"):
            logits_d = dense(**model_inputs(dense, ids)).logits.float()[0]  # (T, V)
        with timer.stage("compressed"):
            logits_c = compressed(**model_inputs(dense, ids)).logits.float()[0]  # (T, V)
        predicted_d, labels = predictions(logits_d, ids[0], seq2seq)  # (N, V), (N,)
        sums["nll_dense"] += F.cross_entropy(predicted_d, labels, reduction="sum").item()
        sums["nll_compressed"] += F.cross_entropy(predictions(logits_c, ids[0], seq2seq)[0], labels,
                                                  reduction="sum").item()
        sums["predicted"] += labels.numel()
        logp_d, logp_c = logits_d.log_softmax(-1), logits_c.log_softmax(-1)
        sums["kl"] += F.kl_div(logp_c, logp_d, log_target=True, reduction="sum").item()
        sums["agree"] += int((logits_d.argmax(-1) == logits_c.argmax(-1)).sum())
        sums["tokens"] += ids.shape[1]
        sums["diff_sq"] += (logits_c - logits_d).pow(2).sum().item()
        sums["ref_sq"] += logits_d.pow(2).sum().item()
    predicted = sums["predicted"]
    return {
        "tokens": sums["tokens"],
        "perplexity": {"dense": float(torch.tensor(sums["nll_dense"] / predicted).exp()),
                       "compressed": float(torch.tensor(sums["nll_compressed"] / predicted).exp())},
        "drift": {"logits_rel_error": (sums["diff_sq"] / sums["ref_sq"]) ** 0.5,
                  "kl_per_token": sums["kl"] / sums["tokens"], "top1_agreement": sums["agree"] / sums["tokens"]},
    }


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where ``mask`` is 1, L2-normalised: (B, T, C) → (B, C)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    return F.normalize(pooled, dim=-1)


def _encoder(dense, compressed, tokenizer, text, config, timer, progress) -> dict:
    chunks = paragraphs(text)[: config.max_paragraphs] or [text.strip()]
    cosines, diff_sq, ref_sq = [], 0.0, 0.0
    batches = [chunks[i: i + config.batch_size] for i in range(0, len(chunks), config.batch_size)]
    for batch in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        inputs = tokenizer(batch, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
        with timer.stage("dense"):
            hidden_d = dense(**inputs).last_hidden_state.float()  # (B, T, C)
        with timer.stage("compressed"):
            hidden_c = compressed(**inputs).last_hidden_state.float()  # (B, T, C)
        mask = inputs["attention_mask"].bool()
        diff_sq += (hidden_c - hidden_d)[mask].pow(2).sum().item()
        ref_sq += hidden_d[mask].pow(2).sum().item()
        mask = inputs["attention_mask"]
        cosines.append((mean_pool(hidden_d, mask) * mean_pool(hidden_c, mask)).sum(-1))
    cosine = torch.cat(cosines)
    return {"paragraphs": len(chunks),
            "drift": {"hidden_rel_error": (diff_sq / ref_sq) ** 0.5, "cosine_mean": float(cosine.mean()),
                      "cosine_min": float(cosine.min())}}
