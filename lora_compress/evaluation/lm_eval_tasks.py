"""lm-evaluation-harness tasks scored on the dense and the compressed model, side by side.

    TaskConfig(tasks, limit, include_path)
      dense, compressed ──HFLM(model, tokenizer)──▶ lm_eval.simple_evaluate ──▶ per task and metric:
      {"metrics": {"acc": {"dense", "compressed", "dense_stderr", "compressed_stderr"}}, "samples": n}

Both models go in as objects, so the dense one may come from a GGUF file and the compressed one
from ``lc.load``; lm-eval's own command line scores the compressed folder alike through its
modeling file (``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``), which
builds the same model (tests/test_remote_code.py). lm-eval is the optional ``[eval]`` extra.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import LoraCompressError
from ..storage.checkpoint import is_causal_lm

INSTALL = "pip install 'lora-compress[eval]'"
BOOTSTRAP_ITERS = 1000  # resamples for the stderr of non-mean metrics (perplexity); lm-eval's default is 100,000


@dataclass(frozen=True)
class TaskConfig:
    """Which lm-eval tasks to run, and on how much of each."""

    tasks: tuple[str, ...]  # lm-eval task or group names
    limit: int | None = None  # at most this many documents per task (None: all)
    include_path: str | None = None  # a folder of extra task YAMLs (local data, offline)
    batch_size: int = 8  # requests per forward

    def __post_init__(self):
        if not self.tasks or any(not name.strip() for name in self.tasks):
            raise LoraCompressError(f"--tasks {','.join(self.tasks)!r} names no task; give lm-eval task names "
                                    f"separated by commas")
        if self.limit is not None and self.limit < 1:
            raise LoraCompressError(f"--limit {self.limit} must be a positive integer")
        if self.batch_size < 1:
            raise LoraCompressError(f"batch size {self.batch_size} must be a positive integer")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise LoraCompressError(f"--include-path {self.include_path} is not a folder; pass the folder that holds "
                                    f"the task YAMLs")

    @classmethod
    def parse(cls, tasks: str, **options) -> "TaskConfig":
        """From ``--tasks a,b`` as typed."""
        return cls(tuple(name.strip() for name in tasks.split(",")), **options)


def task_accuracy(dense: nn.Module, compressed: nn.Module, tokenizer, config: TaskConfig,
                  progress: bool = True) -> dict:
    """Score both models on the same documents of every task.

    Returns:
        ``{task: {"metrics": {metric: {"dense", "compressed", "dense_stderr", "compressed_stderr"}},
        "samples": documents scored}}``.

    Example:
        >>> task_accuracy(dense, lc.load("out"), tokenizer, TaskConfig(("movie_sentiment",), limit=100,
        ...               include_path=".cache/eval_tasks"))["movie_sentiment"]["metrics"]["acc"]

    Raises:
        LoraCompressError: lm-eval missing, an encoder, no tokenizer (or one without BOS/EOS), an unknown
            task, or task data unreadable.
    """
    if not is_causal_lm(dense):
        raise LoraCompressError(f"lm-eval tasks score causal language models; {type(dense).__name__} is not one "
                                f"(drop --tasks, use --text)")
    if tokenizer is None:
        raise LoraCompressError("the model folder has no tokenizer; copy its tokenizer files next to config.json")
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise LoraCompressError("lm-eval starts each request with the tokenizer's BOS or EOS token, and this one has "
                                "neither; set eos_token in tokenizer_config.json")
    manager = _task_manager(config)
    with _quiet(progress):
        scores = {role: run_tasks(model, tokenizer, config, manager)
                  for role, model in (("dense", dense), ("compressed", compressed))}
    return side_by_side(scores["dense"], scores["compressed"])


def run_tasks(model: nn.Module, tokenizer, config: TaskConfig, manager) -> dict:
    """``{task: {"metrics": {metric: (value, stderr)}, "samples": n}}`` of one model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
    try:
        output = simple_evaluate(model=lm, tasks=list(config.tasks), limit=config.limit, task_manager=manager,
                                 log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS)
    except OSError as error:  # datasets' "not found" and network errors are all OSErrors
        raise LoraCompressError(f"lm-eval could not read the data of {','.join(config.tasks)} "
                                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); offline, define the "
                                f"tasks over local files and pass their folder with --include-path") from None
    samples = output.get("n-samples", {})
    return {task: {"metrics": _metrics(values), "samples": samples.get(task, {}).get("effective")}
            for task, values in output["results"].items()}


def _metrics(values: dict) -> dict:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, "alias": …}`` as ``{"acc": (v, s)}``."""
    metrics = {}
    for key, value in values.items():
        name, _, filtering = key.partition(",")
        if not filtering or name.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = values.get(f"{name}_stderr,{filtering}")
        label = name if filtering == "none" else f"{name} ({filtering})"
        metrics[label] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return metrics


def side_by_side(dense: dict, compressed: dict) -> dict:
    """The two models' scores merged per task and metric."""
    merged = {}
    for task, scores in dense.items():
        metrics = {}
        for metric, (value, stderr) in scores["metrics"].items():
            other, other_stderr = compressed[task]["metrics"][metric]
            metrics[metric] = {"dense": value, "compressed": other, "dense_stderr": stderr,
                               "compressed_stderr": other_stderr}
        merged[task] = {"metrics": metrics, "samples": scores["samples"]}
    return merged


def _task_manager(config: TaskConfig):
    """lm-eval's task index (built-in tasks plus ``include_path``), checked against the names asked for."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LoraCompressError(f"--tasks needs lm-evaluation-harness; {INSTALL}") from None
    manager = TaskManager(include_path=config.include_path)
    unknown = [name for name in config.tasks if name not in manager.all_tasks]
    if unknown:
        where = f" or in {config.include_path}" if config.include_path else ""
        raise LoraCompressError(f"lm-eval knows no task {unknown[0]!r}{where}; pass a task it lists "
                                f"(`lm-eval ls tasks`) or --include-path with a folder holding its YAML")
    return manager


@contextmanager
def _quiet(progress: bool):
    """lm-eval logs every step at INFO and warns that a model object skips its loading options; keep errors.
    Without ``progress``, datasets' bars are off too."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
