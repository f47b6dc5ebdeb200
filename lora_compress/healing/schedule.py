"""The training schedule: linear warm-up then cosine decay, endless seeded shuffles, and when to stop
(steps done, or the next step would overrun the time budget)."""
from __future__ import annotations

import math

import torch

from .config import HealConfig, HealReport


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to 0.1 as progress goes 0 → 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def shuffled_batches(count: int, size: int, generator: torch.Generator):
    """Endless seeded shuffles of range(count), ``size`` indices at a time."""
    while True:
        order = torch.randperm(count, generator=generator)
        for i in range(0, count - size + 1 if count >= size else 1, size):
            yield order[i: i + size]


def stopped(report: HealReport, config: HealConfig, step: int, elapsed: float, last: float) -> bool:
    """True (and report.stopped set) once the steps are done or the next step would overrun the budget."""
    if config.steps and step >= config.steps:
        report.stopped = "steps"
    elif config.minutes and elapsed + last > config.minutes * 60:  # last: the previous step's seconds
        report.stopped = "time"
    return bool(report.stopped)


def schedule_progress(config: HealConfig, step: int, elapsed: float) -> float:
    """How far through the schedule: by steps when given, else by the time budget."""
    return step / config.steps if config.steps else elapsed / (config.minutes * 60)
