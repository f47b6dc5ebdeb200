"""Teacher-written training text for healing: the dense model continues prompts taken from the
calibration text.

Healing on a short text learns that text: the training KL keeps falling while the held-out KL
stalls. Continuations sampled from the teacher add contexts the student has not seen, on which
it is matched to the teacher all the same (as self-data distillation does for pruned models). The
sampler is calibrate/generation.py's, which also writes calibration text.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..calibrate.generation import GENERATE_BATCH, end_tokens, sample_top_k

DEADLINE_BATCH = 16  # sequences written at once under a time limit (finer stops, slightly slower)
PROMPT_TOKENS = 32  # tokens of calibration text each continuation starts from (at most a quarter of a sequence)


@torch.no_grad()
def teacher_sequences(teacher: nn.Module, sequences: torch.Tensor, count: int, seed: int,
                      bfloat16: bool = False, minutes: float | None = None) -> torch.Tensor:
    """``count`` token sequences as long as the rows of ``sequences`` (N, T): each a random window of
    ``sequences`` continued by ``teacher`` to T tokens (sampled, seeded; in bf16 autocast with
    ``bfloat16``, 1.3× faster on an AVX512-BF16 CPU: the text only sets contexts, so its precision
    does not matter). With ``minutes``, writing stops after the first batch of DEADLINE_BATCH that ends
    past that time: the sequences written so far are returned (fewer than ``count``).

    Returns:
        (count, T) token ids on ``sequences``' device.

    Example:
        >>> written = teacher_sequences(teacher, train_ids, 64, seed=0)  # train_ids: (62, 512)
        >>> written.shape
        torch.Size([64, 512])
    """
    length = sequences.shape[1]
    prompt = max(1, min(PROMPT_TOKENS, length // 4))
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(sequences), (count,), generator=generator).tolist()
    starts = torch.randint(length - prompt + 1, (count,), generator=generator).tolist()
    prompts = torch.stack([sequences[r, s:s + prompt] for r, s in zip(rows, starts)])  # (count, prompt)
    written = []
    autocast = torch.autocast(sequences.device.type, dtype=torch.bfloat16, enabled=bfloat16)
    sampler, ends = torch.Generator(sequences.device).manual_seed(seed), end_tokens(teacher)
    start = time.perf_counter()
    with autocast:
        for batch in prompts.split(GENERATE_BATCH if minutes is None else DEADLINE_BATCH):
            written.append(sample_top_k(teacher, batch, length - prompt, sampler, banned=ends))
            if minutes is not None and time.perf_counter() - start > minutes * 60:
                break
    return torch.cat(written)
