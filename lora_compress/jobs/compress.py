"""``compress(MODEL, OUT, config, run)``: a checkpoint (folder, GGUF or Hub id) in, a self-contained folder out.

    in memory   load_dense → pipelines.plan.compress_ → save_weights + finish_compressed (config, modeling
                file, manifest)
    streamed    a data-free method tensor by tensor (pipelines/tensorwise.py, also under torchrun), a
                calibrated one block by block (stream/block_loader.py under pipelines/calibrated.py)

Which pipeline runs is pipelines/plan.py's choice; whether it streams, jobs/memory.py's estimate. The output
is written into a temporary folder beside OUT and renamed at the end (storage/output.py).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ..calibrate.tokens import calibration_tokens, read_calibration_text
from ..core.experts import experts_manifest
from ..core.pages import releasing_checkpoint_pages
from ..errors import LoraCompressWarning, OptionError
from ..methods.config import RANK_OPTIONS, CompressConfig, RunConfig, recipe_configs
from ..methods.registry import get_method
from ..methods.results import CompressionReport
from ..pipelines.calibrated import compress_calibrated
from ..pipelines.distributed import join, launched, leave
from ..pipelines.plan import CALIBRATED, Plan, calibration_mix, compress_, generated_share
from ..pipelines.tensorwise import compress_tensorwise
from ..report.folder import report_images, write_report
from ..storage.card import compressed_card, write_card
from ..storage.checkpoint import copy_side_files, load_dense, load_tokenizer, resolve_source
from ..storage.compressed import finish_compressed, save_weights
from ..storage.manifest import Manifest, read_recipe
from ..storage.output import atomic_folder, check_output_folder, holds_outputs
from ..storage.shards import ShardWriter
from ..stream.block_loader import BlockLoader
from ..stream.lazy import open_lazily
from ..version import versions
from . import memory
from .heal_step import check_heal, heal_compressed


def configs_from(recipe: str | None, options: dict) -> tuple[CompressConfig, RunConfig]:
    """The two configs of a run from the command line's ``options`` (None or empty: not given), over those
    of ``recipe`` (a compressed folder or its manifest) when one is named: a rank option given replaces the
    recipe's rank option, a method given drops the recipe's method knobs.

    Raises:
        LoraCompressError: the recipe is not a compressed folder or manifest.
    """
    given = {key: value for key, value in options.items() if value is not None and value != ()}
    config, run = ({}, {}) if recipe is None else recipe_configs(read_recipe(recipe))
    if any(key in given for key in RANK_OPTIONS):
        config = {key: value for key, value in config.items() if key not in RANK_OPTIONS}
    if given.get("method", config.get("method")) != config.get("method"):
        config.pop("options", None)
    fields = CompressConfig.__dataclass_fields__
    config.update({key: value for key, value in given.items() if key in fields})
    run.update({key: value for key, value in given.items() if key not in fields})
    return CompressConfig.from_dict(config), RunConfig.from_dict(run)


def build_manifest(source, model, plan: Plan, report: CompressionReport, command=None) -> Manifest:
    """The ``lora_compress.json`` of a compressed model: what was read, the two configs that repeat the run
    (``settings`` and ``run``), what each layer became."""
    return Manifest(
        base_model=source.name,
        base_model_folder=str(source.folder.resolve()),  # where it was read: the name may be relative
        gguf_file=source.gguf_file,
        model_class=type(model).__name__,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        method=plan.config.method,
        settings=plan.config.to_dict(),
        run={**plan.run.to_dict(), "calib": _recorded(plan.run.calib)},
        command=command or " ".join(sys.argv),
        versions=versions(),
        targeted_params={"dense": report.dense_params, "compressed": report.params},
        layers=report.manifest_layers(),
        experts=experts_manifest(model),  # split experts modules: a loader splits these before the factors go in
        calibration=report.calibration,
    )


@holds_outputs()
def compress(model: str, out: str | Path, config: CompressConfig, run: RunConfig = RunConfig(), *,
             gguf_file: str | None = None, force: bool = False, command: str | None = None, progress: bool = True,
             adapters: bool = False) -> CompressionReport:
    """Compress a checkpoint (folder, GGUF or Hub id) into a self-contained folder ``out``.

    Before any compute the peak memory of the in-memory and the streamed path is estimated from
    the shapes and the calibration size (jobs/memory.py) and compared with the memory available,
    or ``run.memory_limit`` (bytes, or a size such as ``"20G"``): the in-memory path when it fits, else
    streamed (a warning says so), else a LoraCompressError naming the figures.

    ``run.stream`` reads and writes one tensor (a data-free method; implied under torchrun, see
    :mod:`lora_compress.pipelines.tensorwise`) or one transformer block (a calibrated method) at a time;
    ``run.dtype`` sets the dtype the output is stored in (the checkpoint's by default; the calibrated pass
    computes in float32 where the device has no fast kernels for a half-precision dtype); ``adapters``
    also writes ``adapters.safetensors``, the factors alone.

    Example:
        >>> report = compress("models/minilm", "out/minilm-50", CompressConfig(ratio=0.5))
        >>> model = load("out/minilm-50")

    Raises:
        LoraCompressError: bad input of any kind, or not enough memory for any path; nothing is written then.
    """
    check_output_folder(Path(out), force, inputs=(model,))
    plan = Plan.make(config, run, distributed=launched())
    calibrated = plan.pipeline == CALIBRATED
    wants_text = calibrated or run.heal_minutes is not None  # a data-free method heals on the text too
    text = read_calibration_text(run.calib) if wants_text and run.calib and not run.data_free else None
    source = resolve_source(model, gguf_file)
    streaming_asked = run.stream or launched()
    checkpoint = None if source.gguf_file and not streaming_asked else open_lazily(source, plan.config, run.torch_dtype)
    job = _Job(source, plan, out, force, command, progress, adapters, model)
    streams = _streams(source, checkpoint, plan, streaming_asked)
    check_heal(run, plan.config.method, source, streams)
    if streams:
        if plan.config.max_loss_rise is not None:
            raise OptionError("{max_loss_rise} measures the whole model's loss on held-out text and the model does "
                              "not fit in memory here; raise {memory_limit} or pass {budget} instead")
        if calibrated:
            return job.calibrated_streamed(checkpoint, text)
        return job.streamed(checkpoint)
    return job.in_memory(text)


class _Job:
    """One compress job's paths after the plan: in memory, or streamed (data-free or calibrated)."""

    def __init__(self, source, plan: Plan, out, force: bool, command, progress: bool, adapters: bool, model: str):
        self.source, self.plan, self.out, self.force, self.command = source, plan, Path(out), force, command
        self.progress, self.adapters, self.inputs = progress, adapters, (model,)
        self.healing: dict | None = None  # the manifest's healing entry after compress --heal

    def in_memory(self, text: str | None) -> CompressionReport:
        run = self.plan.run
        with atomic_folder(self.out, self.force, inputs=self.inputs) as tmp:
            dense = load_dense(self.source, run.torch_dtype or "auto")
            tokenizer = load_tokenizer(self.source)
            tokens = calibration_batch(tokenizer, text, run) if text is not None else None
            with releasing_checkpoint_pages():  # loaded here from its files, never written to
                report = compress_(dense, self.plan.config, run, tokens=tokens, tokenizer=tokenizer,
                                   progress=self.progress, spill_folder=tmp)
            if run.heal_minutes is not None:
                ids = report.tokens if report.tokens is not None else tokens
                self.healing = heal_compressed(dense, self.source, ids, tokenizer, run, progress=self.progress)
            save_weights(tmp, dense)
            self._companions(tmp, dense, tokenizer, report)
        return report

    def streamed(self, checkpoint) -> CompressionReport:
        """A data-free method, one tensor in memory at a time; under torchrun the layers are split, rank 0
        writes."""
        group, report = join(self.plan.run.device), None
        try:
            if not group.is_writer:
                report = compress_tensorwise(checkpoint, self.plan.config, self.plan.run, None, group, self.progress)
                return report
            with atomic_folder(self.out, self.force, inputs=self.inputs) as tmp:
                report = compress_tensorwise(checkpoint, self.plan.config, self.plan.run, tmp, group, self.progress)
                self._companions(tmp, checkpoint.model, load_tokenizer(self.source), report)
            return report
        finally:
            leave(group, finished=report is not None)

    def calibrated_streamed(self, checkpoint, text: str) -> CompressionReport:
        """A calibrated method with one transformer block in memory at a time, in one process: each block is
        written to the output shards and freed as soon as it is compressed."""
        run = self.plan.run
        blocks = BlockLoader(checkpoint, run.device)
        tokenizer = load_tokenizer(self.source)
        tokens = calibration_batch(tokenizer, text, run) if text is not None else None
        self.plan.check_model(checkpoint.model, checkpoint.targets)
        tokens, written = self._written(checkpoint, tokenizer, tokens)
        with atomic_folder(self.out, self.force, inputs=self.inputs) as tmp:
            writer = ShardWriter(tmp)
            with releasing_checkpoint_pages():  # blocks read from the files here, never written to
                report = compress_calibrated(blocks, self.plan.config, tokens, checkpoint.targets,
                                             workers=run.workers, progress=self.progress, spill_folder=tmp,
                                             on_block=lambda index: _write(writer, blocks.tensors(index)))
            _write(writer, blocks.tensors())
            writer.close()
            report.calibration.update(text=run.calib, generated=written)
            self._companions(tmp, checkpoint.model, tokenizer, report)
        return report

    def _written(self, checkpoint, tokenizer, tokens):
        """A streamed run's calibration rows with the share the model writes, as an in-memory run has them: the
        model is loaded whole for the writing alone (weights and a small KV cache, no statistics) where its
        weights fit in memory. Written block by block, each token would read the whole checkpoint again."""
        run = self.plan.run
        share = generated_share(checkpoint.model, tokens, run, tokenizer)
        if not share:
            return tokens, 0
        weights, room = weights_and_room(checkpoint.model, run)
        if weights > room:
            if run.calib_generated is None and tokens is not None:
                warnings.warn(f"the model's weights ({memory.gib(weights)}) do not fit in memory to write calibration "
                              f"text; calibrating on {run.calib} alone", LoraCompressWarning, stacklevel=4)
                return tokens, 0
            raise OptionError(f"{{calib_generated}}: writing text needs the model's weights in memory "
                              f"({memory.gib(weights)}; streamed, every token would read the whole checkpoint "
                              f"again) and {memory.gib(max(room, 0))} is free; pass {{calib}} FILE with "
                              f"{{calib_generated}} 0")
        model = load_dense(self.source, run.torch_dtype or "auto")
        return calibration_mix(model, tokens, share, run, self.plan.config.seed, tokenizer)

    def _companions(self, tmp: Path, model, tokenizer, report: CompressionReport) -> None:
        """Config and modeling file, manifest, tokenizer, report and model card next to the weights."""
        manifest = build_manifest(self.source, model, self.plan, report, self.command)
        if self.healing:
            manifest = manifest.replace(healing=self.healing)
        copy_side_files(self.source, model, tokenizer, tmp)
        finish_compressed(tmp, model.config, manifest, adapters=self.adapters)
        write_report(tmp, manifest)
        write_card(tmp, compressed_card(manifest, report_method(manifest), images=report_images(tmp)),
                   load_path=str(self.out))


def _streams(source, checkpoint, plan: Plan, stream: bool) -> bool:
    """Whether this run streams: as asked where that fits, else whatever path fits (jobs/memory.py)."""
    limit = plan.run.memory_limit
    limit = memory.parse_size(limit) if isinstance(limit, str) else limit
    if checkpoint is None:  # a GGUF file: transformers dequantises it whole; there is no streamed path
        return False
    found = memory.estimate(checkpoint.model, plan, checkpoint.targets, checkpoint.dtype)
    streamed = memory.choose_path(found, stream, limit)
    if streamed and not stream:
        budget = memory.gib(limit) if limit is not None else f"{memory.gib(memory.available_bytes())} available"
        warnings.warn(f"in memory this needs about {memory.gib(found.in_memory)} but {budget}: streaming block by "
                      f"block instead (about {memory.gib(found.streamed)}), as --stream does", LoraCompressWarning,
                      stacklevel=3)
    return streamed


def _recorded(calib: str | None) -> str | None:
    """The calibration text as the manifest records it: a file by its absolute path (a recipe repeats the run
    from anywhere), a datasets name as given."""
    return str(Path(calib).resolve()) if calib and Path(calib).is_file() else calib


def _write(writer: ShardWriter, tensors) -> None:
    for key, tensor in tensors:
        writer.add(key, tensor)


def calibration_batch(tokenizer, text: str, run: RunConfig):
    """The run's calibration sequences, (calib_samples, calib_len) token ids."""
    return calibration_tokens(tokenizer, text, run.calib_samples, run.calib_len)


def weights_and_room(model, run: RunConfig) -> tuple[int, int]:
    """The bytes of ``model``'s weights (a skeleton on meta will do) and the bytes this run has for them."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    limit = memory.parse_size(run.memory_limit) if isinstance(run.memory_limit, str) else run.memory_limit
    return weights, (limit or memory.available_bytes()) - memory.BASELINE


def report_method(manifest: Manifest) -> str:
    """The one-line description of the manifest's method, from the registry."""
    return get_method(manifest.method).summary
