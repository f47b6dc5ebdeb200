"""``compress ... --heal MINUTES``: healing as the last step of the compress job.

    check_heal      before anything is loaded: refuse what healing cannot do (no calibration, a shared basis,
                    an encoder-decoder, a streamed run), each in one line
    heal_compressed after compress_: the factored model distilled from a second, dense copy of the checkpoint
                    on the very calibration tokens the compression used (RunConfig's text, the rows the model
                    wrote itself included: CompressionReport.tokens), plus teacher-written continuations;
                    only the factors learn. A heal that does not lower the held-out loss (NaN, a rising
                    loss, or a held-out loss no lower than before) keeps the unhealed factors and says so
                    in one warning line.

The teacher's features are computed once per sequence and cached (healing/teacher.py: its last hidden
states, from which the exact KL over the whole vocabulary is taken a block of rows at a time).
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LoraCompressError, LoraCompressWarning, OptionError
from ..healing.config import HealConfig, HealStep
from ..healing.loop import heal_
from ..methods.config import RunConfig
from ..methods.registry import get_method
from ..storage.checkpoint import Source, load_dense
from ..storage.compressed import factored_modules

HEAL_LR = 3e-4  # peak AdamW learning rate (benchmarks/heal.md: the sweep on SmolLM2, 20% cut)
HELD_OUT_SHARE = 8  # one calibration sequence in this many (at least 1, at most 8) is held out of training
WRITTEN_PER_SEQUENCE = 4  # teacher-written continuations per training sequence, when the budget allows
WRITE_SHARE = 0.2  # at most about this share of the budget goes to writing them (a loaded machine writes fewer)
WRITE_FROM_MINUTES = 5.0  # below this budget no text is written: the steps are worth more
NOISE = 0.01  # nats per step: the training loss's rise that counts as divergence at the least
DIVERGED = 1.5  # a training loss this many times its first window's mean (over a window) stops the heal
WINDOW = 10  # steps averaged by that test
SHARED_METHODS = ("shared-basis",)  # one basis across experts: heal trains each layer's own factors


def check_heal(run: RunConfig, method: str, source: Source, streamed: bool) -> None:
    """Refuse ``run.heal_minutes`` where healing cannot run, before any compute.

    Raises:
        OptionError: no calibration, a shared-basis method, an encoder-decoder, a streamed run.
    """
    if run.heal_minutes is None:
        return
    if not run.calib and not run.calib_generated and not get_method(method).calibration:
        raise OptionError("{heal_minutes} trains on the calibration text, and this run has none; pass {calib} FILE "
                          "(or {calib_generated} 1)")
    if method in SHARED_METHODS:
        raise OptionError(f"{{heal_minutes}}: {{method}} {method} shares one basis across experts, which healing "
                          f"does not train; drop {{heal_minutes}} or pass another method")
    if _encoder_decoder(source):
        raise OptionError("{heal_minutes}: this model is an encoder-decoder, which healing does not distil yet; "
                          "drop {heal_minutes}")
    if streamed:
        raise OptionError("{heal_minutes} needs the compressed model and its dense teacher in memory, and this run "
                          "streams; drop {heal_minutes} (or {stream}) and heal the folder with `lora-compress heal`")


def _encoder_decoder(source: Source) -> bool:
    path = source.folder / "config.json"
    try:
        return bool(json.loads(path.read_text()).get("is_encoder_decoder")) if path.is_file() else False
    except (OSError, ValueError):
        return False  # an unreadable config.json is the loader's to report


@dataclass
class _Guard:
    """The callback that stops a diverging heal: the mean training loss over WINDOW steps above DIVERGED
    times that of the first WINDOW steps."""

    losses: list[float] = field(default_factory=list)
    diverged: bool = False

    def __call__(self, step: HealStep) -> bool:
        self.losses.append(step.loss)
        if len(self.losses) >= 2 * WINDOW:
            first, recent = self.losses[:WINDOW], self.losses[-WINDOW:]
            # a rise within NOISE nats a step is no divergence (a nearly lossless cut's KL is ~0, even < 0)
            self.diverged = sum(recent) > DIVERGED * max(sum(first), 0.0) + WINDOW * NOISE
        return self.diverged


def heal_config(run: RunConfig, tokens: torch.Tensor) -> HealConfig:
    """The healing settings of a compress run over calibration ``tokens`` (S, T)."""
    held_out = min(8, max(1, len(tokens) // HELD_OUT_SHARE))
    written = WRITTEN_PER_SEQUENCE * (len(tokens) - held_out) if run.heal_minutes >= WRITE_FROM_MINUTES else 0
    return HealConfig(minutes=run.heal_minutes, lr=run.heal_lr or HEAL_LR, held_out=held_out, generate=written,
                      generate_minutes=WRITE_SHARE * run.heal_minutes, seed=0)


def heal_compressed(model: nn.Module, source: Source, tokens: torch.Tensor, tokenizer, run: RunConfig, *,
                    progress: bool = True) -> dict:
    """Heal the compressed ``model`` in place against the checkpoint at ``source``, on ``tokens``.

    Returns:
        The manifest's ``healing`` entry (HealReport.manifest, with ``kept``: healed | unhealed and why).
    """
    teacher = load_dense(source, run.torch_dtype or "auto").to(next(model.parameters()).device)
    before = {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone())
              for name, m in factored_modules(model).items()}
    guard = _Guard()
    config = heal_config(run, tokens)
    try:
        report = heal_(model, teacher, tokenizer, None, config, progress=progress, callback=guard, sequences=tokens)
    except LoraCompressError as error:  # e.g. writing text ate the budget: the compressed model is still good
        _restore(model, before)
        warnings.warn(f"healing stopped before training: {error}; kept the unhealed factors", LoraCompressWarning,
                      stacklevel=3)
        return {"settings": config.settings(), "kept": "unhealed", "why_unhealed": f"stopped before training: {error}",
                "source": "compress --heal", "steps": 0, "history": []}
    finally:
        del teacher
    why = _why_unhealed(report, guard)
    if why:
        _restore(model, before)
        warnings.warn(f"healing {why}; kept the unhealed factors (lower --heal-lr, or heal the folder later with "
                      f"`lora-compress heal`)", LoraCompressWarning, stacklevel=3)
    entry = report.manifest(calib=run.calib, teacher=source.name, command=None)
    entry.update(kept="unhealed" if why else "healed", why_unhealed=why or None, source="compress --heal",
                 tokens_seen=report.steps * config.batch_size * tokens.shape[1],
                 written=report.tokens["train"] // tokens.shape[1] - (len(tokens) - config.held_out))
    if report.stopped == "callback":
        entry["stopped"] = "diverged"
    return entry


def _why_unhealed(report, guard: _Guard) -> str:
    """Why the healed factors are not kept ("" when they are)."""
    if report.stopped == "nan":
        return f"stopped: {report.note.split(';')[0]}"
    if guard.diverged:
        return f"stopped at step {report.steps}: the training loss rose to over {DIVERGED:g}× its start"
    before, after = report.held_out_before, report.held_out_after
    if not math.isfinite(after) or after >= before:
        return f"did not lower the held-out loss ({before:.4g} → {after:.4g})"
    return ""


@torch.no_grad()
def _restore(model: nn.Module, factors: dict) -> None:
    for name, module in factored_modules(model).items():
        module.lora_A.copy_(factors[name][0])
        module.lora_B.copy_(factors[name][1])
