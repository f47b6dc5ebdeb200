"""Which parts of the calibrated methods help: MiniLM embeddings at one cut, variant by variant.

Cosine similarity of mean-pooled embeddings to the dense model on the first 400 movie-review
snippets of bench_quality.py, after keeping 80% of the targeted weights. The ablated variants are
methods of their own, registered here (one config + one handler each), as a user would add one.

Usage: python scripts/bench_quality_ablations.py [--calib-samples 8]
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

from bench_quality import CALIB, MINILM, embed, movie_snippets

from lora_compress import CompressConfig, MethodConfig, calibration_tokens, compress_, register_method
from lora_compress.calibrate.collectors import CrossGram, InputGram
from lora_compress.core.whitening import Whitening
from lora_compress.methods.whiten import shared_cholesky
from lora_compress.storage.checkpoint import load_dense, load_tokenizer, resolve_source
from lora_compress.storage.text import read_text


@dataclass(frozen=True)
class ClosedLoopConfig(MethodConfig):
    """The closed loop alone: compressed-stream inputs, no output weighting, no refit."""


@register_method("closed-loop", ClosedLoopConfig, statistics=(InputGram(every_layer=True),), closed_loop=True,
                 summary="ablation: whitening on the compressed model's own inputs, block by block")
def factor_closed_loop(weight, rank, stats, config, **solver):
    return Whitening(weight, stats["gram"], cholesky=shared_cholesky(stats)).factors(rank)


@dataclass(frozen=True)
class ClosedLoopRefitConfig(MethodConfig):
    """The closed loop with the least-squares refit to the dense outputs, no output weighting."""

    ridge: float = 0.0  # relative ridge of the refit; 0 is the exact least squares


@register_method("closed-loop-refit", ClosedLoopRefitConfig, closed_loop=True,
                 statistics=(InputGram(every_layer=True), CrossGram()),
                 summary="ablation: the closed loop refitted to the dense outputs")
def factor_closed_loop_refit(weight, rank, stats, config, **solver):
    return Whitening(weight, stats["gram"], cross=stats["cross"], ridge=config.ridge,
                     cholesky=shared_cholesky(stats)).factors(rank)


# label: (method or its config, rank option)
VARIANTS = {
    "whiten, uniform": ("whiten", "ratio"),
    "sequential inputs, uniform": ("closed-loop", "ratio"),
    "sequential + exact refit, uniform": (ClosedLoopRefitConfig(ridge=0.0), "ratio"),
    "sequential + refit (ridge 0.1), uniform": (ClosedLoopRefitConfig(ridge=0.1), "ratio"),
    "sequential + Fisher row weights, uniform": ("sequential", "ratio"),
    "whiten + budget allocation": ("whiten", "budget"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-samples", type=int, default=8)
    args = parser.parse_args()
    source = resolve_source(str(MINILM))
    dense, tokenizer = load_dense(source), load_tokenizer(source)
    tokens = calibration_tokens(tokenizer, read_text(CALIB), args.calib_samples, 256)
    texts = movie_snippets()[0][:400]
    reference = embed(dense, tokenizer, texts)
    for label, (method, option) in VARIANTS.items():
        model, start = copy.deepcopy(dense), time.perf_counter()
        compress_(model, CompressConfig(method=method, **{option: 0.8}), progress=False, tokens=tokens)
        cosine = float((embed(model, tokenizer, texts) * reference).sum(-1).mean())
        print(f"| {label} | {cosine:.4f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
