"""The ``lora-compress`` command line: thin click commands over the library; no math here."""
from __future__ import annotations

import functools
import shlex
import sys
import warnings

import click

from .errors import LoraCompressError, LoraCompressWarning, OptionError, OptionWarning


def flag(field: str) -> str:
    """The command line's word for a config field: its option (``calib_samples`` → ``--calib-samples``), or
    the field itself where the command has no option for it (a method's knob)."""
    context = click.get_current_context(silent=True)
    names = {option for param in (context.command.params if context else []) for option in param.opts}
    option = "--" + field.replace("_", "-")
    return option if option in names else field


def user_errors(command):
    """Turn LoraCompressError into one line on stderr and exit code 2, and the library's warnings
    (LoraCompressWarning) into ``warning:`` lines on stderr as they happen; settings are named by their
    flags (errors.OptionError)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("always", LoraCompressWarning)
            shown = warnings.showwarning

            def show(message, category, *rest, **options):
                if not issubclass(category, LoraCompressWarning):
                    return shown(message, category, *rest, **options)
                text = message.worded(flag) if isinstance(message, OptionWarning) else message
                click.echo(f"warning: {text}", err=True)
            warnings.showwarning = show
            try:
                return command(*args, **kwargs)
            except LoraCompressError as error:
                text = error.worded(flag) if isinstance(error, OptionError) else error
                click.echo(f"error: {text}", err=True)
                sys.exit(2)
    return wrapper


def quiet_libraries() -> None:
    """Silence transformers' own progress bars and notices (our bars stay unless --quiet)."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def command_line() -> str:
    """The command as typed, for manifests and model cards."""
    return "lora-compress " + " ".join(shlex.quote(a) for a in sys.argv[1:])


@click.group()
@click.version_option(package_name="lora-compress")
def main():
    """Compress Hugging Face checkpoints into low-rank factors and measure what it cost."""
    quiet_libraries()


model_argument = click.argument("model")
gguf_option = click.option("--gguf-file", help="Name of a GGUF file inside the model's folder (MODEL, BASE or --base).")
include_option = click.option("--include", multiple=True, help="Regex on module names to target (repeatable).")
exclude_option = click.option("--exclude", multiple=True, help="Regex on module names to leave dense (repeatable).")
force_option = click.option("--force", is_flag=True, help="Replace an existing output folder.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bar.")
CALIB_HELP = "Calibration text: a UTF-8 file (.txt, or .jsonl with a text field), or a datasets name."


def calibration_options(samples: int | None = 32, length: int | None = 256, calib_help: str = CALIB_HELP,
                        required: bool = False, shown: tuple[int, int] | None = None):
    """--calib, --calib-samples and --calib-len, spelled and explained alike in every command; ``shown``: the
    defaults a command fills in itself (its options default to None so that a recipe can fill them)."""
    def decorate(command):
        length_note = f" [default: {shown[1]}]" if shown else " [default: 512, or the model's context if shorter]"
        samples_note = f" [default: {shown[0]}]" if shown else " [default: every sequence the text holds]"
        length_help = "Tokens per calibration sequence." + ("" if length else length_note)
        samples_help = "Calibration sequences." + ("" if samples else samples_note)
        command = click.option("--calib-len", type=int, default=length, show_default=bool(length), help=length_help)(command)
        command = click.option("--calib-samples", type=int, default=samples, show_default=bool(samples),
                               help=samples_help)(command)
        return click.option("--calib", required=required, help=calib_help)(command)
    return decorate


def method_help() -> str:
    """--method's help, from the registry: every method's one-line summary."""
    from .methods.registry import methods

    listed = "; ".join(f"{m.name}: {m.summary}" for m in methods())
    return f"How each layer is factored. {listed}. auto = sequential with --calib or --budget, else svd."


def method_choices() -> list[str]:
    from .methods.registry import method_names

    return ["auto", *method_names()]


def deprecated(old: str, new: str, value, current):
    """``value`` of a deprecated option (with a one-line notice) when given, else the current option's."""
    if value is None:
        return current
    warnings.warn(f"{old} is deprecated; use {new}", LoraCompressWarning, stacklevel=2)
    return value if current is None else current


@main.command()
@model_argument
@gguf_option
@include_option
@exclude_option
@click.option("--spectrum", is_flag=True, help="Per layer type: ranks keeping 90/95/99% of the energy.")
@click.option("--plot", type=click.Path(), help="With --spectrum: write spectrum/energy PNGs into this folder.")
@calibration_options(calib_help="With --spectrum: also whitened spectra from this calibration text (a UTF-8 file, "
                     "or a datasets name).")
@user_errors
def inspect(model, gguf_file, include, exclude, spectrum, plot, calib, calib_samples, calib_len):
    """List targeted layers: shapes, parameters, break-even rank (or, with --spectrum, their spectra)."""
    from .report.inspect import inspect_model, inspect_spectra

    if spectrum or plot or calib:
        click.echo(inspect_spectra(model, gguf_file, tuple(include), tuple(exclude), plot, calib,
                                   calib_samples, calib_len))
    else:
        click.echo(inspect_model(model, gguf_file, tuple(include), tuple(exclude)))


@main.command()
@model_argument
@click.option("--out", required=True, type=click.Path(), help="Output folder (must not exist unless --force).")
@click.option("--recipe", type=click.Path(), help="Repeat a run: a compressed folder (or its lora_compress.json) "
              "whose method, rank rule, targets and calibration are used; options given here override them.")
@click.option("--rank", type=int, help="Same rank for every targeted layer.")
@click.option("--ratio", type=float, help="Keep this fraction of each layer's parameters.")
@click.option("--energy", type=float, help="Keep this fraction of each layer's squared singular values.")
@click.option("--budget", type=float, help="Keep this fraction of all targeted parameters; ranks differ per "
              "layer (calibrated on --calib, or without it on text the model writes itself).")
@click.option("--max-loss-rise", type=float, help="Quality target instead of a size: the smallest model whose "
              "mean next-token loss rises by at most this many nats (e.g. 0.2), predicted from the layers' costs, "
              "then measured on 1 in 8 calibration sequences held out and tightened if over (needs --calib).")
@click.option("--method", type=click.Choice(method_choices()), help=method_help() + " [default: auto]")
@calibration_options(samples=None, length=None, shown=(32, 256))
@click.option("--calib-generated", type=float,
              help="Share of the calibration sequences the model writes itself, continuing short prompts of many "
              "kinds (code, legal, dialogue, reports, lists, maths; top-k sampling, seeded by --seed; causal LMs "
              "only). 0 = the --calib text alone; 1 = data-free. [default: 0.25 for a causal LM, all of them "
              "without --calib, 0 for an encoder]")
@include_option
@exclude_option
@click.option("--solver", "--svd", "solver", help="SVD solver of the data-free methods: auto, full, randomized or "
              "gram (eigh of the smaller Gram matrix); --svd is its former name. [default: auto]")
@click.option("--seed", type=int, help="Seed of every random step: the randomized SVD, the calibration labels "
              "drawn from the model's predictions, the text the model writes. [default: 0]")
@click.option("--max-keep", type=float,
              help="Speed rule: leave a layer dense rather than factor it at a rank keeping more than this "
              "share of its weights (such factored layers run slower than dense ones). [default: 0.9]")
@click.option("--device", help="Where the passes and the SVDs run: cpu, cuda or cuda:N. [default: cpu]")
@click.option("--workers", type=int,
              help="Layers factored at once (a calibrated method: those of one group, e.g. q/k/v), each on its share "
              "of the CPU threads; 0 = auto (one per thread while every layer is 2048² weights or fewer, else 1).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Store the output in this dtype (default: the checkpoint's). Calibration computes in float32 "
              "where the device has no fast kernels for a half-precision dtype.")
@click.option("--expert-min-tokens", type=int,
              help="Calibrated methods on mixture-of-experts models: an expert the router sends fewer calibration "
              "tokens is factored from its weights (plain SVD), as the report says. [default: 16]")
@click.option("--stream", is_flag=True, default=None, help="Read and write one tensor at a time with --method svd "
              "(memory ≈ one layer + 0.5 GiB; implied under torchrun, which splits the layers across processes), one "
              "transformer block at a time with a calibrated method (memory ≈ one block + the calibration "
              "hidden states at every block boundary; one process).")
@click.option("--memory-limit", help="Cap on this run's memory, e.g. 20G (default: what the machine has "
              "available). The path is chosen to fit it before any compute: in memory, else streamed.")
@click.option("--adapters", is_flag=True, help="Also write adapters.safetensors: the factors alone, for "
              "lc.apply_adapters on the original checkpoint (the folder's weights file holds them already).")
@click.option("--heal", "--heal-minutes", "heal_minutes", type=float, help="Then heal the factors for this many "
              "wall-clock minutes: distilled from the dense model on the calibration tokens (plus text it writes), "
              "only the factors trained; kept only if the held-out loss falls (the report says by how much).")
@click.option("--heal-lr", type=float, help="Peak learning rate of --heal. [default: 3e-4]")
@force_option
@quiet_option
@gguf_option
@user_errors
def compress(model, out, recipe, adapters, force, quiet, gguf_file, **options):
    """Factor MODEL's linear layers and write a self-contained folder OUT."""
    from .jobs.compress import compress as compress_checkpoint, configs_from
    from .report.tables import compression_table
    from .pipelines.distributed import is_main_process

    config, run = configs_from(recipe, options)
    report = compress_checkpoint(model, out, config, run, gguf_file=gguf_file, force=force, command=command_line(),
                                 progress=not quiet, adapters=adapters)
    if is_main_process():
        click.echo(compression_table(report))
        click.echo(f"wrote {out}")


@main.command()
@click.argument("base")
@click.argument("compressed", type=click.Path())
@click.option("--text", "text_file", type=click.Path(), help="Real text to measure drift and perplexity on.")
@click.option("--tasks", help="lm-eval tasks to score both models on, comma-separated (needs lora-compress[eval]).")
@click.option("--limit", type=int, help="With --tasks: at most N documents per task.")
@click.option("--include-path", type=click.Path(), help="With --tasks: a folder of task YAMLs (local data, offline).")
@click.option("--json", "json_path", type=click.Path(), help="Also write the figures as JSON here.")
@click.option("--max-tokens", default=4096, show_default=True, help="Causal LMs: tokens of --text used.")
@click.option("--no-report", is_flag=True, help="Leave COMPRESSED as it is (no report/, no model card update).")
@quiet_option
@gguf_option
@user_errors
def evaluate(base, compressed, text_file, tasks, limit, include_path, json_path, max_tokens, no_report, quiet,
             gguf_file):
    """Compare COMPRESSED with its dense BASE model on real text and/or lm-eval tasks; update COMPRESSED's
    report and model card."""
    from .evaluation.lm_eval_tasks import TaskConfig
    from .evaluation.metrics import EvalConfig
    from .jobs.evaluate import check_evaluation_outputs, evaluate_folder, record_evaluation, write_json
    from .report.tables import evaluation_table

    task_config = TaskConfig.parse(tasks, limit=limit, include_path=include_path) if tasks else None
    if task_config is None and (limit or include_path):
        raise LoraCompressError("--limit and --include-path go with --tasks; add --tasks T[,T...]")
    check_evaluation_outputs(compressed, json_path, report=not no_report)
    figures = evaluate_folder(base, compressed, text_file, gguf_file=gguf_file, tasks=task_config,
                              config=EvalConfig(max_tokens=max_tokens), progress=not quiet)
    click.echo(evaluation_table(figures))
    if json_path:
        write_json(figures, json_path)
    if not no_report:
        click.echo(f"wrote {record_evaluation(compressed, figures, command_line())} and {compressed}/README.md")


@main.command()
@click.option("--base", required=True, help="The checkpoint the fine-tune started from.")
@click.option("--tuned", required=True, help="The fine-tuned checkpoint (same architecture).")
@click.option("--out", required=True, type=click.Path(), help="Adapter folder to write (must not exist unless --force).")
@click.option("--rank", type=int, help="Same rank for every changed layer (capped at a layer's smaller dimension).")
@click.option("--energy", type=float, help="Keep this fraction of each delta's squared singular values.")
@click.option("--budget", type=float, help="Adapter weights as a fraction of the changed layers' dense weights.")
@calibration_options(samples=16, calib_help=CALIB_HELP + " Also factor activation-aware; keep what checks better "
                     "(3/4 of the sequences fit, 1/4 check).")
@include_option
@click.option("--exclude", multiple=True, help="Regex on module names never factored; saved whole if changed.")
@click.option("--solver", "--svd", "solver", default="auto", show_default=True,
              help="SVD solver for --rank: auto, full, randomized or gram (--svd: its former name).")
@click.option("--seed", default=0, show_default=True,
              help="Seed of extract's random steps: the randomized SVD, and the random token ids the output check "
              "runs on without --calib.")
@force_option
@quiet_option
@gguf_option
@click.option("--tuned-gguf-file", help="Name of a GGUF file inside the --tuned folder.")
@user_errors
def extract(base, tuned, out, rank, energy, budget, calib, calib_samples, calib_len, include, exclude, solver, seed,
            force, quiet, gguf_file, tuned_gguf_file):
    """Write the fine-tune TUNED − BASE as a PEFT LoRA adapter folder OUT."""
    from .export.extract import ExtractConfig, extract as extract_adapter
    from .report.tables import extraction_table

    config = ExtractConfig(rank=rank, energy=energy, budget=budget, include=tuple(include),
                           exclude=tuple(exclude), solver=solver, seed=seed, calib_samples=calib_samples,
                           calib_len=calib_len)
    report = extract_adapter(base, tuned, out, config, calib=calib, gguf_file=gguf_file,
                             tuned_gguf_file=tuned_gguf_file, force=force, command=command_line(), progress=not quiet)
    click.echo(extraction_table(report))
    click.echo(f"wrote {out}")


@main.command()
@click.argument("folder", type=click.Path())
@click.option("--dense", is_flag=True, help="Write a plain transformers checkpoint (B·A multiplied back).")
@click.option("--upgrade", is_flag=True, help="Rewrite a compressed folder of an older format in today's.")
@click.option("--out", required=True, type=click.Path(), help="Folder to write (must not exist unless --force).")
@click.option("--base", help="For a PEFT adapter FOLDER: the base model (default: the one its config names).")
@force_option
@gguf_option
@user_errors
def export(folder, dense, upgrade, out, base, force, gguf_file):
    """Export FOLDER (compressed, or a PEFT LoRA adapter) as a plain dense checkpoint, or upgrade its format."""
    from .export.dense import export_dense
    from .export.upgrade import upgrade_folder

    if dense == upgrade:
        raise LoraCompressError("give exactly one of --dense or --upgrade")
    if upgrade:
        upgrade_folder(folder, out, force=force)
        click.echo(f"wrote {out} (loads with transformers' from_pretrained(..., trust_remote_code=True))")
        return
    export_dense(folder, out, base=base, gguf_file=gguf_file, force=force, command=command_line())
    click.echo(f"wrote {out} (loads with transformers' from_pretrained alone)")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--plot", type=click.Path(), help="Draw quality (perplexity or cosine) vs parameters into this "
              ".png file.")
@user_errors
def compare(runs, plot):
    """One table across compressed folders RUNS of one base model (e.g. a rank sweep)."""
    from .report.compare import PLOT_SUFFIX, compare_runs, comparison_plot, comparison_table
    from .storage.output import check_file_output

    if plot:
        check_file_output(plot, "--plot", PLOT_SUFFIX)
    loaded = compare_runs(list(runs))
    click.echo(comparison_table(loaded))
    if plot:
        click.echo(f"wrote {comparison_plot(loaded, plot)}")


@main.command()
@click.argument("folder", type=click.Path())
@calibration_options(samples=None, length=None, required=True,
                     calib_help=CALIB_HELP + " Its last 8 sequences are held out.")
@click.option("--out", required=True, type=click.Path(), help="Healed folder to write (must not exist unless --force).")
@click.option("--steps", type=int, help="Optimizer steps (the schedule spans them).")
@click.option("--minutes", type=float, help="Training wall-clock budget [default: 10 when --steps is not given].")
@click.option("--lr", default=3e-4, show_default=True, help="Peak AdamW learning rate.")
@click.option("--train", default="AB", show_default=True, type=click.Choice(["AB", "B", "lora"]),
              help="What learns: both factors, lora_B only, or an extra LoRA merged in at the end.")
@click.option("--lora-rank", default=8, show_default=True, help="Rank of the extra LoRA (--train lora).")
@click.option("--loss", default="auto", show_default=True,
              help="kl, hidden, kl+hidden or kl+blocks (KL plus 8 matched block outputs); auto = kl for LMs.")
@click.option("--block-weight", default=1.0, show_default=True, help="Weight of the block-output term (kl+blocks).")
@click.option("--generate", default=0, show_default=True,
              help="Teacher-written sequences (continuations of calibration text) added to the training set; "
              "writing them counts against --minutes.")
@click.option("--batch-size", default=2, show_default=True, help="Sequences per step.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of heal's random steps: the batch order, the extra LoRA's start and the teacher-written text.")
@click.option("--checkpointing", is_flag=True, help="Gradient checkpointing: less memory, slower steps.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"]),
              help="Matmuls of the student's body in training steps; auto = bfloat16 where the device has fast "
              "bf16 kernels (weights, heads, KL, teacher and held-out loss stay float32).")
@click.option("--base", help="The dense model to match (the teacher) [default: the manifest's base model].")
@gguf_option
@force_option
@quiet_option
@click.option("--teacher", help="Deprecated spelling of --base.")
@click.option("--seq-len", type=int, help="Deprecated spelling of --calib-len.")
@user_errors
def heal(folder, calib, calib_samples, calib_len, out, steps, minutes, lr, train, lora_rank, loss, block_weight,
         generate, batch_size, seed, checkpointing, precision, base, gguf_file, force, quiet, teacher, seq_len):
    """Fine-tune compressed FOLDER's factors to match its dense base model; write OUT."""
    from .healing.config import HealConfig
    from .healing.folder import heal as heal_folder
    from .report.tables import healing_table

    base = deprecated("--teacher", "--base", teacher, base)
    calib_len = deprecated("--seq-len", "--calib-len", seq_len, calib_len)
    minutes = 10.0 if minutes is None and steps is None else minutes
    config = HealConfig(steps=steps, minutes=minutes, lr=lr, train=train, lora_rank=lora_rank, loss=loss,
                        block_weight=block_weight, generate=generate, calib_len=calib_len,
                        calib_samples=calib_samples, batch_size=batch_size, seed=seed, checkpointing=checkpointing,
                        precision=precision)
    report = heal_folder(folder, calib, out, config, base=base, gguf_file=gguf_file, force=force,
                         command=command_line(), progress=not quiet)
    click.echo(healing_table(report))
    click.echo(f"wrote {out}")
