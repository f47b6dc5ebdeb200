"""Which parts of the calibrated methods help: MiniLM embeddings at one cut, variant by variant.

Cosine similarity of mean-pooled embeddings to the dense model on the first 400 movie-review
snippets of bench_quality.py, after keeping 80% of the targeted weights.

Usage: python scripts/bench_quality_ablations.py [--calib-samples 8]
"""
from __future__ import annotations

import argparse
import copy
import time

from bench_quality import CALIB, MINILM, embed, movie_snippets

from lora_compress import aware
from lora_compress.aware import Recipe
from lora_compress.calibrate import calibration_tokens
from lora_compress.checkpoint import load_dense, load_tokenizer, resolve_source
from lora_compress.compress import CompressConfig, compress_
from lora_compress.text import read_text

# label: (method, rank option, recipe swapped in for "sequential", refit ridge)
VARIANTS = {
    "whiten, uniform": ("whiten", "ratio", None, 0.0),
    "sequential inputs, uniform": ("sequential", "ratio", Recipe(True, False, False), 0.0),
    "sequential + exact refit, uniform": ("sequential", "ratio", Recipe(True, True, False), 0.0),
    "sequential + refit (ridge 0.1), uniform": ("sequential", "ratio", Recipe(True, True, False), 0.1),
    "sequential + Fisher row weights, uniform": ("sequential", "ratio", Recipe(True, False, True), 0.0),
    "whiten + budget allocation": ("whiten", "budget", None, 0.0),
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
    default = aware.RECIPES["sequential"]
    for label, (method, option, recipe, ridge) in VARIANTS.items():
        aware.RECIPES["sequential"], aware.CORRECTION_RIDGE = recipe or default, ridge
        model, start = copy.deepcopy(dense), time.perf_counter()
        compress_(model, CompressConfig(method=method, **{option: 0.8}), progress=False, tokens=tokens)
        cosine = float((embed(model, tokenizer, texts) * reference).sum(-1).mean())
        print(f"| {label} | {cosine:.4f} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
