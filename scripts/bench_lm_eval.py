"""lm-evaluation-harness accuracy of SmolLM2-135M, dense and compressed by the default method → benchmarks/lm-eval.md.

Each cut C is what ``lora-compress compress SMOLLM2 --budget 1-C --calib .cache/text/asyoulik.txt``
writes (sequential method, 32×256 calibration tokens). Both models are scored by lm-eval 0.4 on the
project's local tasks (scripts/prepare_eval_tasks.py): zero-shot sentiment of human-rated movie-review
snippets, and the last word of held-out prose paragraphs (alice29, lcet10), as
``lora-compress evaluate --tasks`` scores them; the dense model is scored once.

Usage: python scripts/bench_lm_eval.py [--cuts 0.1,0.2,0.4] [--limit N] [--recompress]
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from prepare_examples import SMOLLM2, TEXT
from prepare_eval_tasks import TASKS, prepare

import lora_compress as lc
from lora_compress.core.counting import total_params
from lora_compress.evaluation.lm_eval_tasks import TaskConfig, _task_manager, run_tasks
from lora_compress.storage.checkpoint import load_dense, load_tokenizer, resolve_source
from lora_compress.storage.compressed import read_manifest, weight_bytes

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "lm-eval.md"
FOLDERS = REPO / ".cache" / "bench" / "lm-eval"
CALIB = TEXT / "asyoulik.txt"
NAMES = ("movie_sentiment", "prose_last_word")
COLUMNS = [("movie_sentiment", "acc"), ("prose_last_word", "acc"), ("prose_last_word", "perplexity")]


def compressed_folder(cut: float, recompress: bool) -> tuple[Path, float]:
    """The default compression at ``cut``, written (or reused when its settings match); (folder, seconds)."""
    folder, budget = FOLDERS / f"smollm2-cut{round(cut * 100)}", round(1 - cut, 4)
    if not recompress and folder.is_dir():
        settings = read_manifest(folder).settings
        if settings.get("budget") == budget and settings.get("calib") == str(CALIB):
            return folder, float("nan")
    start = time.perf_counter()
    lc.compress(str(SMOLLM2), folder, lc.CompressConfig(budget=budget), lc.RunConfig(calib=str(CALIB)), force=True, command=f"lora-compress compress {SMOLLM2} --budget {budget} --calib {CALIB} --out {folder}")
    return folder, time.perf_counter() - start


def score(model, tokenizer, config, manager) -> tuple[dict, float]:
    start = time.perf_counter()
    return run_tasks(model, tokenizer, config, manager), time.perf_counter() - start


def cell(scores: dict, task: str, metric: str) -> str:
    value, stderr = scores[task]["metrics"][metric]
    return f"{value:.2f}" if metric == "perplexity" else f"{value:.3f} ± {stderr:.3f}"


def table_head(limit, samples) -> list[str]:
    return ["# lm-eval accuracy: SmolLM2-135M dense vs compressed (default method)", "",
            "Command (from the repository root; one run, on the project's shared 2-core CPU machine, so seconds "
            "are rough):", "", "```", "python " + " ".join(shlex.quote(a) for a in sys.argv), "```", "",
            f"Each cut is `lora-compress compress {SMOLLM2.relative_to(REPO)} --budget 1-cut --calib "
            f"{CALIB.relative_to(REPO)}` (sequential, 32×256 calibration tokens). Tasks: lm-eval 0.4 over "
            f"`.cache/eval_tasks` (scripts/prepare_eval_tasks.py); documents per task: "
            f"{', '.join(f'{k} {v}' for k, v in samples.items())}{' (--limit)' if limit else ''}. "
            "movie_sentiment: zero-shot, `Review: …\\nSentiment:` → ` negative` / ` positive` (chance 0.5). "
            "prose_last_word: the last word of a paragraph by greedy match (acc) and its perplexity. "
            "± is lm-eval's standard error.", "",
            "| model | whole-model params kept | weight bytes kept | movie_sentiment acc | prose_last_word acc | "
            "prose_last_word perplexity | compress s | lm-eval s |", "|---|---|---|---|---|---|---|---|"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", default="0.1,0.2,0.4")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--recompress", action="store_true", help="compress again even when a folder matches")
    args = parser.parse_args()
    if not (TASKS / "movie_sentiment.yaml").is_file():
        prepare()
    config = TaskConfig(NAMES, limit=args.limit, include_path=str(TASKS))
    manager = _task_manager(config)
    source = resolve_source(str(SMOLLM2))
    dense, tokenizer = load_dense(source), load_tokenizer(source)
    dense_scores, seconds = score(dense, tokenizer, config, manager)
    samples = {task: dense_scores[task]["samples"] for task in NAMES}
    lines = table_head(args.limit, samples)
    lines.append(f"| dense | 1.000 | 1.000 | {' | '.join(cell(dense_scores, *c) for c in COLUMNS)} | - | {seconds:.0f} |")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(lines[-1], flush=True)
    dense_params, dense_bytes = total_params(dense), weight_bytes(source.folder)
    del dense
    for cut in [float(c) for c in args.cuts.split(",")]:
        folder, compress_seconds = compressed_folder(cut, args.recompress)
        model = lc.load(folder)
        scores, seconds = score(model, tokenizer, config, manager)
        lines.append(f"| {cut:.0%} cut | {total_params(model) / dense_params:.3f} | "
                     f"{weight_bytes(folder) / dense_bytes:.3f} | {' | '.join(cell(scores, *c) for c in COLUMNS)} | "
                     f"{compress_seconds:.0f} | {seconds:.0f} |")
        OUT.write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)
        del model


if __name__ == "__main__":
    main()
