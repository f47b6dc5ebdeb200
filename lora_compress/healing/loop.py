"""Healing a model in place: the distillation loop and what guards it.

    teacher (dense, frozen) ─► features h_t ─► cached once (teacher.py) ─► teacher head ─► p_t
    student (factored)      ─► features h_s ───────────────────────────────► student head ─► p_s

A step draws a seeded batch of training sequences, takes the loss (losses.py) under the student's
precision (trainable.py), clips and steps AdamW on float32 weights and state, with linear warm-up and
cosine decay (schedule.py). A loss or gradient that is not finite stops training and keeps the last
weights whose loss was finite. ``generate`` adds teacher-written sequences to the training set
(teacher_text.py): a short text is otherwise learnt by heart, and new contexts generalise better
(SmolLM2, 15 minutes, 20% cut: 31.90 → 31.48 alice perplexity; 40%: 57.90 → 54.15).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate.seq2seq import is_encoder_decoder
from ..calibrate.timing import StageTimer
from ..calibrate.tokens import calibration_tokens
from ..errors import LoraCompressError, OptionError
from ..storage.compressed import factored_modules
from .config import HealConfig, HealReport, HealStep, resolve_loss
from .losses import distill_loss
from .schedule import lr_factor, schedule_progress, shuffled_batches, stopped
from .teacher import TeacherCache
from .teacher_text import teacher_sequences
from .trainable import autocast, resolve_precision, restore, trainable

SEQ_LEN = 512  # default tokens per training sequence (capped at the model's context)


def heal_(model: nn.Module, teacher: nn.Module, tokenizer, text: str | None, config: HealConfig, *,
          progress: bool = True, callback: Callable[[HealStep], bool | None] | None = None,
          sequences: torch.Tensor | None = None) -> HealReport:
    """Fine-tune ``model``'s factors in place so its outputs match ``teacher``'s on ``text``.

    Args:
        model: a compressed model (with LowRankLinear layers), e.g. from :func:`lora_compress.load`.
        teacher: the dense model it was compressed from (left unchanged).
        tokenizer: their tokenizer.
        text: calibration text; its last ``held_out`` sequences are never trained on.
        config: steps / time budget, learning rate, trained set, loss.
        callback: called with a :class:`HealStep` after every optimizer step; returning True stops
            training there (``report.stopped == "callback"``).
        sequences: calibration token ids (S, T) to train on instead of tokenizing ``text`` (e.g. the
            very tokens a compression used); ``calib_len`` and ``calib_samples`` then come from them.

    Returns:
        A HealReport. On a NaN loss training stops and the last weights with a finite loss are kept.

    Raises:
        LoraCompressError: no factored layers, text too short, teacher shapes differ, or the loss is
            not finite before training.
    """
    if sequences is not None:
        config = replace(config, calib_len=sequences.shape[1], calib_samples=len(sequences))
    config = _with_calib_len(config, model)
    _check_pair(model, teacher, config)
    report = HealReport(config, resolve_loss(config.loss, model),
                        resolve_precision(next(model.parameters()).device, config.precision))
    timer = StageTimer()
    device = next(teacher.parameters()).device
    ids = _sequences(tokenizer, text, config, device) if sequences is None else _given(sequences, device)
    data = TeacherCache.of(teacher, ids, config.held_out, report.loss, config.batch_size, timer)
    config = _add_teacher_text(teacher, data, config, report, timer)
    report.tokens = {"train": data.train_ids.numel(), "held_out": data.held_ids.numel()}
    dtype, grad_flags = next(model.parameters()).dtype, {p: p.requires_grad for p in model.parameters()}
    model.float()  # train in float32 whatever the storage dtype; casting back is exact for frozen tensors
    torch.manual_seed(config.seed)
    params, extra = trainable(model, config)
    try:
        report.trained_params = sum(p.numel() for p in params)
        report.held_out_before = _held_out_loss(model, data, report.loss, config)
        if not math.isfinite(report.held_out_before):
            raise LoraCompressError("the compressed model's loss is not finite before healing; compress it again")
        _train(model, params, data, config, report, progress, callback)
        report.held_out_after = _held_out_loss(model, data, report.loss, config)
        report.teacher_minutes = timer.seconds.get("teacher", 0.0) / 60
        if extra:
            extra.merge_(model)
    finally:
        if extra:
            extra.remove()
        restore(model, dtype, grad_flags)
    return report


def _sequences(tokenizer, text: str, config: HealConfig, device) -> torch.Tensor:
    """Back-to-back ``calib_len``-token sequences of ``text`` (at most ``calib_samples``), (S, T): the
    calibration tokenizer's, at least two (one to train on, one held out)."""
    sequences = calibration_tokens(tokenizer, text, config.calib_samples, config.calib_len, consecutive=True,
                                   least=2)
    return sequences.to(device)


def _given(sequences: torch.Tensor, device) -> torch.Tensor:
    """Token ids handed over by the caller, checked: at least two sequences (one to train on, one held out)."""
    if sequences.ndim != 2 or len(sequences) < 2:
        raise OptionError(f"healing needs at least 2 calibration sequences (one is held out), got "
                          f"{tuple(sequences.shape)}; raise {{calib_samples}}")
    return sequences.to(device)


def _add_teacher_text(teacher: nn.Module, data: TeacherCache, config: HealConfig, report: HealReport,
                      timer: StageTimer) -> HealConfig:
    """Append ``config.generate`` teacher-written sequences to the training set; returns the config
    with the time they took taken off the budget."""
    if not config.generate:
        return config
    if data.head is None:
        raise OptionError("{generate} needs a causal LM (a KL loss); drop it for this model")
    with timer.stage("generation"):
        written = teacher_sequences(teacher, data.train_ids, config.generate, config.seed,
                                    report.precision == "bfloat16", config.generate_minutes)
    data.train_ids = torch.cat([data.train_ids, written])
    report.generation_minutes = timer.seconds["generation"] / 60
    if config.minutes is None:
        return config
    if report.generation_minutes >= config.minutes:
        raise OptionError(f"writing {config.generate} teacher sequences took {report.generation_minutes:.1f} "
                          f"of the {config.minutes:g} minutes; lower {{generate}} or raise {{minutes}}")
    return replace(config, minutes=config.minutes - report.generation_minutes)


def _with_calib_len(config: HealConfig, model: nn.Module) -> HealConfig:
    """``config`` with ``calib_len`` set: the default is SEQ_LEN, or the model's positions if fewer."""
    if config.calib_len is not None:
        return config
    positions = getattr(model.config, "max_position_embeddings", None) or SEQ_LEN
    return replace(config, calib_len=min(SEQ_LEN, positions))


def _check_pair(model: nn.Module, teacher: nn.Module, config: HealConfig) -> None:
    """A compressed student, and a teacher whose untouched tensors have the student's shapes."""
    factored = factored_modules(model)
    if not factored:
        raise LoraCompressError("the model has no factored layers to heal; compress it first")
    if is_encoder_decoder(model):
        raise LoraCompressError(f"{type(model).__name__} is an encoder-decoder; heal distils causal LMs and encoders, "
                                f"not encoder-decoders yet (compress, evaluate and export work)")
    shapes = {n: p.shape for n, p in teacher.named_parameters()}
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] not in factored and shapes.get(name) != param.shape:
            found = tuple(shapes[name]) if name in shapes else "missing"
            raise OptionError(f"the base model's {name} is {found}, the compressed model's {tuple(param.shape)}; "
                              f"pass {{base}} with the model it was compressed from")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.calib_len > positions:
        raise OptionError(f"{{calib_len}} {config.calib_len} exceeds the model's {positions} positions; "
                          f"pass {{calib_len}} {positions} or less")


@torch.no_grad()
def _held_out_loss(model: nn.Module, data: TeacherCache, loss: str, config: HealConfig) -> float:
    """Mean distillation loss over the held-out sequences."""
    batches = zip(data.held_ids.split(config.batch_size), data.held_targets.split(config.batch_size))
    losses = [distill_loss(model, data.head, ids, target, loss, config.block_weight).item() * len(ids)
              for ids, target in batches]
    return sum(losses) / len(data.held_ids)


def _train(model, params, data: TeacherCache, config: HealConfig, report: HealReport, progress, callback) -> None:
    """The optimisation loop; fills report.history / stopped / note / minutes."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    good = [p.detach().clone() for p in params]  # the last weights whose loss was finite
    batches = shuffled_batches(len(data.train_ids), config.batch_size, torch.Generator().manual_seed(config.seed))
    bar = tqdm(total=config.steps, desc="healing", unit="step", disable=not progress)
    start, last, step = time.perf_counter(), 0.0, 0
    while not stopped(report, config, step, elapsed := time.perf_counter() - start, last):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, schedule_progress(config, step, elapsed), config.warmup)
        index = next(batches)
        targets = data.train_targets(index)
        with autocast(params[0].device, report.precision):
            loss = distill_loss(model, data.head, data.train_ids[index], targets, report.loss, config.block_weight)
        if not torch.isfinite(loss):  # these weights are bad: back to those of the previous step
            _stop_on_nan(params, good, report, step, kept=max(step - 1, 0))
            break
        _copy(good, params)
        loss.backward()
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, config.clip)):  # keep these weights
            _stop_on_nan(params, good, report, step, kept=step)
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, last = step + 1, time.perf_counter() - start - elapsed
        report.history.append({"step": step, "minutes": (elapsed + last) / 60, "loss": loss.item()})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", minutes=f"{(elapsed + last) / 60:.1f}")
        if callback and callback(HealStep(step, (elapsed + last) / 60, loss.item(), model)) is True:
            report.stopped = "callback"
            break
    bar.close()
    report.minutes = (time.perf_counter() - start) / 60


@torch.no_grad()
def _copy(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.copy_(source)


def _stop_on_nan(params, good, report: HealReport, step: int, kept: int) -> None:
    _copy(params, good)
    report.stopped = "nan"
    report.note = (f"the loss (or its gradient) became NaN at step {step + 1}; kept the weights after "
                   f"step {kept}, the last with a finite loss; lower the learning rate (lr)")
