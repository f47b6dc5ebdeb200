"""Text the dense model writes itself: top-k sampling with a KV cache allocated once, and calibration
sequences written from short prompts of many kinds (code, legal, dialogue, reports, lists, maths), or
from the model's BOS token alone when no tokenizer is at hand.

Calibration text is whatever the user has; the model's own writing covers what it knows how to say,
so directions that text never excites are not cut for free (issue 17: SmolLM2 at a 20% cut with a
quarter of its 32 calibration sequences written from BOS, worst held-out domain 2.70× → 2.51× dense
calibrated on a play; issue 23: written from prompts of several kinds, see docs/research-domains.md).
healing/teacher_text.py writes its continuations with the same sampler.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import OptionError

TOP_K = 50  # top-k sampling: coherent text without the loops of greedy decoding (top-p sorts the vocabulary: slower)
GENERATE_BATCH = 64  # sequences generated at once
DISTINCT_SPAN = 32  # written tokens after the prompt two rows must not share (else the later one is rewritten)
REWRITES = 3  # rounds of rewriting repeated rows before keeping them
PROMPTS = (  # short openings of many kinds of text; each row continues one, drawn in a seeded order
    "def parse_args(argv):\n    ", "import numpy as np\n\nclass Matrix:\n", "SELECT name, COUNT(*) FROM orders",
    "#include <stdio.h>\n\nint main(void) {\n", "function handleClick(event) {\n",
    "THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS", "Section 2. Definitions.\n", "The Tenant agrees that",
    "\"Where were you last night?\" she asked.", "Q: How do I reset my password?\nA:", "JOHN: I told you already.\n",
    "Quarterly report: revenue for the third quarter", "Abstract. We study", "The committee met on Tuesday to",
    "Ingredients:\n- 2 cups flour\n-", "Top 10 tips for", "1. Open the lid.\n2.", "| Name | Age | City |\n",
    "Theorem 1. Let n be a positive integer.", "Solve for x: 3x + 7 = 22.", "The derivative of f(x) = x^2 is",
    "Once upon a time", "Dear Sir or Madam,\n\nI am writing to", "BREAKING: Officials confirmed today that",
)


def generation_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot write calibration text from its BOS token (None when it can): it needs a
    language-model head (a causal LM, not an encoder such as MiniLM or an encoder-decoder) and a BOS
    (or, failing that, EOS) token id in its config."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) or not callable(getattr(model, "get_output_embeddings", None)) \
            or model.get_output_embeddings() is None:
        return f"{type(model).__name__} has no language-model head to write text with"
    start, vocabulary = start_token(model), model.get_output_embeddings().weight.shape[0]
    if start is None:
        return f"{type(model).__name__}'s config names no bos_token_id or eos_token_id to start writing from"
    if not 0 <= start < vocabulary:
        return f"{type(model).__name__}'s start token {start} (its config's BOS, else EOS) lies outside its " \
               f"vocabulary of {vocabulary} tokens"
    return None


def _check_can_write(model: nn.Module) -> None:
    problem = generation_problem(model)
    if problem is not None:
        raise OptionError(f"{{calib_generated}}: {problem}; pass {{calib}} FILE with {{calib_generated}} 0")


def start_token(model: nn.Module) -> int | None:
    """The token written text starts from: the config's BOS, else its (first) EOS."""
    config = model.config
    for token in (config.bos_token_id, *end_tokens(model)):
        if token is not None:
            return int(token)
    return None


@torch.no_grad()
def generated_sequences(model: nn.Module, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens sampled from ``model`` after its start token (no prompt:
    data-free), seeded; the end-of-sequence tokens are never drawn, so every row runs to full length.

    Returns:
        (count, length) token ids, the start token first, on the model's device.

    Raises:
        LoraCompressError: the model cannot write (:func:`generation_problem`).

    Example:
        >>> generated_sequences(model, 8, 256).shape
        torch.Size([8, 256])
    """
    _check_can_write(model)
    device = next(model.parameters()).device
    start = torch.full((count, 1), start_token(model), dtype=torch.long, device=device)
    generator, ends = torch.Generator(device).manual_seed(seed), end_tokens(model)
    rows = [sample_top_k(model, batch, length - 1, generator, banned=ends) for batch in start.split(GENERATE_BATCH)]
    return torch.cat(rows) if rows else start.new_zeros((0, length))


@torch.no_grad()
def prompted_sequences(model: nn.Module, tokenizer, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """``count`` sequences of ``length`` tokens written by ``model``, each continuing one of :data:`PROMPTS`
    (encoded by ``tokenizer``, so with its BOS where it adds one), the prompts taken in a seeded order;
    rows that repeat an earlier row's first written tokens are rewritten (up to :data:`REWRITES` rounds).

    Returns:
        (count, length) token ids on the model's device.

    Raises:
        LoraCompressError: the model cannot write (:func:`generation_problem`).
    """
    _check_can_write(model)
    device = next(model.parameters()).device
    start = [start_token(model)]  # a prompt the tokenizer encodes to nothing starts from BOS
    prompts = [list(tokenizer(p)["input_ids"][: length - 1]) or start for p in dict.fromkeys(PROMPTS)]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    picks = [prompts[order[i % len(prompts)]] for i in range(count)]
    generator = torch.Generator(device).manual_seed(seed)
    rows = _write(model, picks, length, generator, device)
    for _ in range(REWRITES):
        again = repeated_rows(rows, [len(p) for p in picks])
        if not again:
            break
        rows[again] = _write(model, [picks[i] for i in again], length, generator, device)
    return rows


def repeated_rows(rows: torch.Tensor, starts: Sequence[int], span: int = DISTINCT_SPAN) -> list[int]:
    """Indices of the rows of ``rows`` (N, T) whose ``span`` tokens after their prompt (of length
    ``starts[i]``) equal those of an earlier row."""
    seen, repeated = set(), []
    for index, (row, start) in enumerate(zip(rows.tolist(), starts)):
        key = tuple(row[start: start + span])
        if key in seen:
            repeated.append(index)
        seen.add(key)
    return repeated


def _write(model: nn.Module, prompts: list[list[int]], length: int, generator: torch.Generator,
           device) -> torch.Tensor:
    """Rows of ``length`` tokens continuing ``prompts`` (lists of ids of any lengths), in batches: a batch starts
    from its shortest prompt and the longer prompts' remaining tokens are fed in place of samples."""
    rows, ends = [], end_tokens(model)
    for first in range(0, len(prompts), GENERATE_BATCH):
        batch = prompts[first: first + GENERATE_BATCH]
        shortest = min(len(p) for p in batch)
        forced = torch.full((len(batch), length - shortest), -1, dtype=torch.long)  # -1: sampled
        for row, prompt in enumerate(batch):
            forced[row, : len(prompt) - shortest] = torch.tensor(prompt[shortest:], dtype=torch.long)
        start = torch.tensor([p[:shortest] for p in batch], dtype=torch.long, device=device)  # (B, shortest)
        rows.append(sample_top_k(model, start, length - shortest, generator, banned=ends, forced=forced.to(device)))
    return torch.cat(rows)


@torch.no_grad()
def sample_top_k(model: nn.Module, prompts: torch.Tensor, new_tokens: int, generator: torch.Generator,
                 top_k: int = TOP_K, banned: Sequence[int] = (), forced: torch.Tensor | None = None) -> torch.Tensor:
    """``prompts`` (B, P) continued by ``new_tokens`` tokens sampled from ``model``'s ``top_k`` most
    likely next tokens, with a KV cache: (B, P + new_tokens). Tokens in ``banned`` are never drawn;
    ``forced`` (B, new_tokens), where given, holds the token to take instead of a sample (-1: sample).

    Drawing among the k candidates, not over the whole vocabulary with the rest masked as
    ``generate`` does, makes SmolLM2 write 1.35–1.45× faster on a CPU (64 sequences of 160–256
    tokens): there, drawing over 49,152 tokens per row took about as long as all of the model's
    matrix products.
    """
    if new_tokens <= 0:
        return prompts
    keyword, cache = _cache_keyword(model), _static_cache(model, prompts.shape[1] + new_tokens)
    output = model(prompts, use_cache=True, **({} if cache is None else {keyword: cache}))
    banned = torch.tensor(banned, dtype=torch.long, device=prompts.device)
    tokens = [prompts]
    for step in range(new_tokens):
        logits = output.logits[:, -1].float().index_fill(1, banned, -math.inf)  # (B, V)
        values, candidates = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        chosen = candidates.gather(1, torch.multinomial(values.softmax(-1), 1, generator=generator))  # (B, 1)
        if forced is not None:
            chosen = torch.where(forced[:, step: step + 1] >= 0, forced[:, step: step + 1], chosen)
        tokens.append(chosen)
        if step + 1 < new_tokens:
            output = model(chosen, use_cache=True, **{keyword: getattr(output, keyword)})
    return torch.cat(tokens, dim=1)


def _static_cache(model: nn.Module, length: int):
    """A KV cache allocated once for ``length`` positions, as ``generate`` makes for its static cache;
    None for models that keep their own state (as ``generate`` asks) or a transformers without it.

    The default cache grows by concatenation, copying every layer's keys and values at each token:
    SmolLM2 writing 64 sequences took 0.09 s a step at 32 tokens of context and 0.49 s at 480. With
    the cache allocated once, a step takes 0.15 s at any length up to 512.
    """
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if supports is not None and not supports():
        return None
    try:
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=length)
    except (ImportError, TypeError):  # transformers < 5 names the arguments differently
        return None


def end_tokens(model: nn.Module) -> list[int]:
    """The model's end-of-sequence token ids, so written sequences run to full length."""
    ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = model.config.eos_token_id if ends is None else ends
    return [] if ends is None else [ends] if isinstance(ends, int) else list(ends)


def _cache_keyword(model: nn.Module) -> str:
    """The forward's name for the KV cache, in and out: ``cache`` in recent transformers (which warns
    at ``past_key_values``), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def with_generated(model: nn.Module, tokens: torch.Tensor, fraction: float, seed: int = 0,
                   tokenizer=None) -> torch.Tensor:
    """``tokens`` (N, T) with round(fraction·N) of its rows replaced by sequences ``model`` writes: from
    :data:`PROMPTS` with ``tokenizer`` (:func:`prompted_sequences`), else from its BOS token
    (:func:`generated_sequences`); the user's rows kept are spread evenly over ``tokens``.

    Returns:
        (N, T) token ids: the user's rows first, then the written ones.
    """
    count = round(fraction * len(tokens))
    if count == 0:
        return tokens
    keep = len(tokens) - count
    picks = torch.linspace(0, len(tokens) - 1, keep).round().long()  # (keep,)
    written = generated_rows(model, count, tokens.shape[1], seed, tokenizer).to(tokens.device, tokens.dtype)
    return torch.cat([tokens[picks], written])


def generated_rows(model: nn.Module, count: int, length: int, seed: int = 0, tokenizer=None) -> torch.Tensor:
    """``count`` rows the model writes: from prompts when a ``tokenizer`` can encode them, else from BOS."""
    if tokenizer is None:
        return generated_sequences(model, count, length, seed)
    return prompted_sequences(model, tokenizer, count, length, seed)
