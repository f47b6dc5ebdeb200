"""The teacher's side of distillation: calibration sequences split train / held-out, and the teacher's
features of each, computed once (the held-out set first, a training sequence on its first use) and read
from the cache in later epochs, so a short run never pays for a teacher pass over text it does not reach.

Features are the last hidden states (the input of the LM head), with up to BLOCK_TARGETS evenly spaced
block outputs stacked before them for the "kl+blocks" loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibrate.forward import forward
from ..calibrate.timing import StageTimer

BLOCK_TARGETS = 8  # decoder-block outputs matched by the "blocks" loss term (evenly spaced)


def features(model: nn.Module, ids: torch.Tensor, blocks: bool = False) -> torch.Tensor:
    """Last hidden states (the LM head's input for causal LMs): (B, T) → (B, T, C); with ``blocks``,
    the matched block outputs stacked before them: (B, K + 1, T, C)."""
    if not blocks:
        return forward(model.base_model, ids).last_hidden_state
    output = forward(model.base_model, ids, output_hidden_states=True)
    inner = output.hidden_states[1:-1]  # outputs of every decoder block but the last
    return torch.stack([*(inner[i] for i in block_indices(len(inner))), output.last_hidden_state], dim=1)


def block_indices(count: int) -> list[int]:
    """Up to BLOCK_TARGETS evenly spaced indices into ``count`` block outputs, the last one included."""
    picked = min(BLOCK_TARGETS, count)
    return [math.ceil((i + 1) * count / picked) - 1 for i in range(picked)]


@dataclass
class TeacherCache:
    """Calibration sequences, split train / held-out, with the teacher's features cached (module docstring)."""

    teacher: nn.Module
    train_ids: torch.Tensor  # (N, T)
    held_ids: torch.Tensor  # (M, T)
    head: nn.Module | None  # the teacher's output embedding (KL losses only)
    blocks: bool = False  # cache matched block outputs too ("blocks" loss)
    timer: StageTimer = field(default_factory=StageTimer)  # "teacher": the teacher's forwards
    cache: dict[int, torch.Tensor] = field(default_factory=dict)  # train sequence → (T, C), (K + 1, T, C) with blocks
    held_targets: torch.Tensor | None = None  # (M, T, C) float32

    @classmethod
    def of(cls, teacher: nn.Module, sequences: torch.Tensor, held_out: int, loss: str, batch_size: int,
           timer: StageTimer) -> "TeacherCache":
        """The cache for ``sequences`` (S, T), its last ``held_out`` rows held out (their features made now)."""
        held = min(held_out, len(sequences) - 1)
        teacher.eval()
        data = cls(teacher, sequences[:-held], sequences[-held:],
                   teacher.get_output_embeddings() if "kl" in loss else None, "blocks" in loss, timer)
        data.held_targets = torch.cat([data.teacher_features(ids) for ids in data.held_ids.split(batch_size)])
        return data

    @torch.no_grad()
    def teacher_features(self, ids: torch.Tensor) -> torch.Tensor:
        with self.timer.stage("teacher"):
            return features(self.teacher, ids, self.blocks).float()  # (B, T, C) or (B, K + 1, T, C)

    def train_targets(self, index: torch.Tensor) -> torch.Tensor:
        """Teacher features of training sequences ``index``: (B, T, C)."""
        missing = [i for i in index.tolist() if i not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.teacher_features(self.train_ids[missing])))
        return torch.stack([self.cache[i] for i in index.tolist()])
