"""One validation, and the one place a pipeline is chosen, from what the method declares (as
llm-compressor's ``CalibrationPipeline.from_modifiers`` chooses from the modifiers).

    data-free    a method that declares no statistics: every layer from its weight, in memory
                 (datafree.py) or a tensor at a time, also under torchrun (tensorwise.py)
    calibrated   a method that declares statistics: block by block over a BlockSource (calibrated.py),
                 the model in memory, streamed a block at a time (stream/block_loader.py), or an
                 encoder-decoder's two stacks

    compress_(model, CompressConfig(ratio=0.5))                                        →  CompressionReport
    compress_(model, CompressConfig(budget=0.8), RunConfig(calib="play.txt"), tokens=ids)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..calibrate.block_source import ResidentBlocks
from ..calibrate.generation import generated_rows, generation_problem, with_generated
from ..core.targets import expose_experts_, find_targets
from ..errors import OptionError
from ..methods.config import CompressConfig, RunConfig, resolve
from ..methods.ranks import check_fixed_rank
from ..methods.results import CompressionReport
from .calibrated import compress_calibrated
from .datafree import compress_datafree_
from .target import check_language_model, compress_to_target

DATA_FREE, CALIBRATED = "data-free", "calibrated"


@dataclass(frozen=True)
class Plan:
    """A checked pair of configs and the pipeline they call for."""

    config: CompressConfig  # resolved: ``auto`` replaced by the method it stands for
    run: RunConfig

    @classmethod
    def make(cls, config: CompressConfig, run: RunConfig, tokens_given: bool = False,
             distributed: bool = False) -> "Plan":
        """Check ``config`` and ``run`` together, once, before anything is loaded (``tokens_given``: the caller
        passes calibration tokens itself; ``distributed``: launched by torchrun).

        Raises:
            OptionError: settings that contradict each other, naming the fields and the fix.
        """
        config = resolve(config, run, tokens_given)
        plan = cls(config, run)
        if distributed and plan.pipeline == CALIBRATED:
            raise OptionError(f"{{method}} {config.method} streams block by block in one process; drop torchrun "
                              f"(torchrun splits the data-free methods only)")
        if config.max_loss_rise is not None and (run.stream or distributed):
            raise OptionError("{max_loss_rise} measures the whole model's loss on held-out text, which needs it in "
                              "memory; drop {stream} (and torchrun)")
        return plan

    @property
    def pipeline(self) -> str:
        """``calibrated`` for a method that declares statistics, else ``data-free``."""
        return CALIBRATED if self.config.record.calibration else DATA_FREE

    def check_model(self, model: nn.Module, targets: dict[str, nn.Module], length: int | None = None) -> None:
        """What the model decides, before any compute: a fixed rank per layer, the calibration length
        (``length``: that of the tokens handed over, else the run's).

        Raises:
            OptionError: naming the layer or the model's limit, and the fix.
        """
        check_fixed_rank(targets, self.config.rank)
        if self.config.max_loss_rise is not None:
            check_language_model(model)
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        length = self.run.calib_len if length is None else length
        if self.pipeline == CALIBRATED and positions and length > positions:
            raise OptionError(f"{{calib_len}} {length} is longer than the model's {positions} positions; pass "
                              f"{{calib_len}} {positions} or less")


def compress_(model: nn.Module, config: CompressConfig, run: RunConfig = RunConfig(), *,
              tokens: torch.Tensor | None = None, tokenizer=None, progress: bool = True,
              spill_folder: Path | None = None) -> CompressionReport:
    """Factor every targeted layer of ``model`` in place, by the pipeline ``config``'s method calls for.

    Args:
        model: a transformers model (or any nn.Module with nn.Linear / Conv1D layers); fused experts
            holding a target are split into one module per expert first (core/experts.py).
        config: rank option, targets, method and its knobs.
        run: calibration (``calib`` is recorded; the text itself comes as ``tokens``), device, workers.
        tokens: calibration token ids (samples, length), needed by every calibrated method
            (:func:`lora_compress.calibrate.tokens.calibration_tokens`) unless the model writes them all
            (``run.calib_generated == 1``); a share ``run.calib_generated`` of the rows is replaced by
            sequences the model writes (:mod:`lora_compress.calibrate.generation`).
        tokenizer: the model's tokenizer, to encode the prompts the model writes from; without one it writes
            from its BOS token alone.
        spill_folder: where a calibrated run parks large intermediate tensors on disk (default: a
            temporary folder of its own).

    Returns:
        A CompressionReport listing each targeted layer's rank (None when left dense).

    Example:
        >>> report = compress_(model, CompressConfig(ratio=0.5))
        >>> report.params / report.dense_params
        0.49...

    Raises:
        LoraCompressError: a bad rank for some layer, a pattern matching nothing, a bad weight.
    """
    plan = Plan.make(config, run, tokens_given=tokens is not None)
    expose_experts_(model, plan.config.include, plan.config.exclude)  # each expert's matrices become targets
    targets = find_targets(model, plan.config.include, plan.config.exclude)
    plan.check_model(model, targets, None if tokens is None else tokens.shape[1])
    if plan.pipeline == DATA_FREE:
        return compress_datafree_(model, plan.config, run, progress)
    if tokens is None and not run.data_free:
        raise OptionError(f"{{method}} {plan.config.method} needs calibration text; pass tokens= (calibration_tokens"
                          f"(tokenizer, text, samples, length)), or {{calib_generated}} 1: the model writes its own")
    share = generated_share(model, tokens, run, tokenizer)

    def compress_once(tokens: torch.Tensor, rise_limit: float | None = None) -> CompressionReport:
        tokens, written = calibration_mix(model, tokens, share, run, plan.config.seed, tokenizer)
        report = compress_calibrated(ResidentBlocks(model, run.device), plan.config, tokens, targets,
                                     workers=run.workers, progress=progress, spill_folder=spill_folder,
                                     rise_limit=rise_limit)
        report.calibration.update(text=run.calib, generated=written)
        report.tokens = tokens  # what healing trains on (jobs/heal_step.py)
        return report

    if plan.config.max_loss_rise is not None:
        return compress_to_target(model, dict(targets), tokens, plan.config.max_loss_rise, compress_once)
    return compress_once(tokens)


def generated_share(model: nn.Module, tokens: torch.Tensor | None, run: RunConfig, tokenizer=None) -> float:
    """The share of the calibration rows ``model`` writes in this run (:meth:`RunConfig.generated_share`): all of
    them without ``tokens``; by default a share only where a ``tokenizer`` can encode the prompts of a causal LM."""
    if tokens is None:
        return 1.0
    return run.generated_share(tokenizer is not None and generation_problem(model) is None, has_text=True)


def calibration_mix(model: nn.Module, tokens: torch.Tensor | None, share: float, run: RunConfig, seed: int,
                    tokenizer=None) -> tuple[torch.Tensor, int]:
    """The calibration tokens a run uses: ``tokens`` with a ``share`` of its rows written by ``model`` (all of
    them when there are no tokens: ``run.calib_samples`` rows of ``run.calib_len``); and how many were written."""
    if tokens is None:  # data-free: every sequence written
        return generated_rows(model, run.calib_samples, run.calib_len, seed, tokenizer), run.calib_samples
    return with_generated(model, tokens, share, seed, tokenizer), round(share * len(tokens))
