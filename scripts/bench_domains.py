"""Cross-domain quality: calibrate on one text, evaluate on every domain → a markdown table.

SmolLM2-135M: perplexity (first 4,096 tokens, 1,024-token windows, labels = input ids; as
bench_quality.perplexity) on prose fiction (alice29), verse (plrabn12), a report (lcet10), a
play (asyoulik), movie-review snippets, Python source code and legal text, each as a ratio to
the dense model's perplexity. A domain is *held out* when it is not the calibration text; each
row gives the worst and the mean held-out ratio and the seconds the compression took.
all-MiniLM-L6-v2: cosine of mean-pooled embeddings to the dense model on paragraph sets of
the same domains (the first 300 paragraphs of each evaluation file, 128 tokens at most).

The evaluation files of the extra domains are disjoint from their ``*_calib.txt`` halves
(prepare_examples.py --only domains), so those can be calibrated on too.

Usage: python scripts/bench_domains.py --calib asyoulik,lcet10 --cuts 0.2,0.4 --out FILE
       [--models smollm2,gemma3,minilm] [--calib-generated 0.25] [--option input_shrinkage=0.2 ...]

``--option NAME=VALUE`` sets a field of the method's config (e.g. SequentialConfig's); ``--calib-generated``
is CompressConfig's share of model-written calibration sequences, written inside the timed compression.
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from bench_quality import embed, markdown, perplexity
from prepare_examples import CACHE, GEMMA, MINILM, SMOLLM2, TEXT

from lora_compress.calibrate.tokens import calibration_tokens
from lora_compress.pipelines.plan import compress_
from lora_compress.methods.config import CompressConfig, RunConfig
from lora_compress.methods.registry import get_method
from lora_compress.storage.checkpoint import load_dense, load_tokenizer, resolve_source
from lora_compress.storage.text import paragraphs, read_text

DOMAINS = {"alice29": "alice29.txt", "plrabn12": "plrabn12.txt", "lcet10": "lcet10.txt", "asyoulik": "asyoulik.txt",
           "movies": "movie_reviews.txt", "python": "python_code.txt", "legal": "legal.txt"}
CALIB_FILES = {"python": "python_code_calib.txt", "legal": "legal_calib.txt", "movies": "movie_reviews_calib.txt"}
PROSE_OR_LEGAL = ("alice29", "plrabn12", "lcet10", "asyoulik", "movies", "legal")
DENSE_CACHE = CACHE / "bench" / "dense_domains.json"
PARAGRAPHS = 300  # MiniLM: paragraphs per domain
RANKS = {}  # "model/calib/cut" → layer → rank (None = dense), written beside the table


def calib_path(name: str) -> Path:
    """A domain name (its calibration half where it has one) or a file path."""
    if name in DOMAINS:
        return TEXT / CALIB_FILES.get(name, DOMAINS[name])
    return Path(name)


def held_out(domain: str, calib: str) -> bool:
    return domain != calib


def dense_figures(key: str, compute) -> dict[str, float]:
    """Dense figures per domain, cached in DENSE_CACHE under ``key``."""
    cache = json.loads(DENSE_CACHE.read_text()) if DENSE_CACHE.exists() else {}
    if key not in cache or set(cache[key]) != set(DOMAINS):
        cache[key] = compute()
        DENSE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        DENSE_CACHE.write_text(json.dumps(cache, indent=1))
    return cache[key]


def method_config(method: str, options: list[str]):
    """The method's config with ``options`` (NAME=VALUE) set, or its name when there are none."""
    if not options:
        return method
    fields = {}
    for option in options:
        name, _, value = option.partition("=")
        fields[name] = float(value)
    return get_method(method).config_class(**fields)


def compress_copy(dense, cut: float, tokens, method, calib: str, generated: float | None, tokenizer):
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    run = RunConfig(calib=None if generated == 1 else calib, calib_generated=generated)
    report = compress_(model, CompressConfig(budget=1 - cut, method=method), run, progress=False, tokens=tokens,
                       tokenizer=tokenizer)
    return model, report, time.perf_counter() - start


def summary(ratios: dict[str, float], calib: str, higher_is_better: bool = False) -> list[str]:
    """Worst and mean over the held-out domains, and the worst held-out prose-or-legal domain."""
    held = {d: r for d, r in ratios.items() if held_out(d, calib)}
    pick = min if higher_is_better else max
    worst = pick(held, key=held.get)
    prose = {d: r for d, r in held.items() if d in PROSE_OR_LEGAL}
    worst_prose = pick(prose, key=prose.get)
    return [f"{held[worst]:.3f} ({worst})", f"{sum(held.values()) / len(held):.3f}",
            f"{prose[worst_prose]:.3f} ({worst_prose})"]


def lm_rows(name, folder, calibs, cuts, samples, length, method, tokens_eval, generated):
    """Rows of a causal LM's table: its dense perplexities, then each calibration text and cut as ratios."""
    source = resolve_source(str(folder))
    dense, tokenizer = load_dense(source), load_tokenizer(source)
    texts = {d: TEXT / f for d, f in DOMAINS.items()}
    base = dense_figures(f"{name}/{tokens_eval}",
                         lambda: {d: perplexity(dense, tokenizer, p, tokens_eval) for d, p in texts.items()})
    yield ["dense", "-", *[f"{base[d]:.2f}" for d in DOMAINS], "-", "-", "-", "-"]
    for calib in calibs:
        tokens = calibration_tokens(tokenizer, read_text(calib_path(calib)), samples, length)
        for cut in cuts:
            model, report, seconds = compress_copy(dense, cut, tokens, method, str(calib_path(calib)), generated,
                                                   tokenizer)
            RANKS[f"{name}/{calib}/{cut}"] = {layer.name: layer.rank for layer in report.layers}
            ratios = {d: perplexity(model, tokenizer, p, tokens_eval) / base[d] for d, p in texts.items()}
            yield [calib, f"{cut:.0%}", *[f"{ratios[d]:.3f}" for d in DOMAINS], *summary(ratios, calib),
                   f"{seconds:.0f}"]
            del model


def paragraph_sets() -> dict[str, list[str]]:
    return {d: paragraphs(read_text(TEXT / f))[:PARAGRAPHS] for d, f in DOMAINS.items()}


def minilm_rows(calibs, cuts, samples, length, method):
    source = resolve_source(str(MINILM))
    dense, tokenizer = load_dense(source), load_tokenizer(source)
    sets = paragraph_sets()
    reference = {d: embed(dense, tokenizer, texts) for d, texts in sets.items()}
    for calib in calibs:
        tokens = calibration_tokens(tokenizer, read_text(calib_path(calib)), samples, length)
        for cut in cuts:
            model, report, seconds = compress_copy(dense, cut, tokens, method, str(calib_path(calib)), None,
                                                   tokenizer)  # an encoder writes nothing: the default share is 0
            cosine = {d: float((embed(model, tokenizer, sets[d]) * reference[d]).sum(-1).mean()) for d in sets}
            yield [calib, f"{cut:.0%}", *[f"{cosine[d]:.4f}" for d in DOMAINS],
                   *summary(cosine, calib, higher_is_better=True), f"{seconds:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", default="asyoulik,lcet10", help="calibration domains (or files), comma-separated")
    parser.add_argument("--cuts", default="0.1,0.2,0.3,0.4", help="fractions of targeted parameters removed")
    parser.add_argument("--models", default="smollm2,gemma3,minilm")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--method", default="sequential")
    parser.add_argument("--option", action="append", default=[], help="NAME=VALUE: a field of the method's config")
    parser.add_argument("--calib-generated", type=float, default=RunConfig.calib_generated,
                        help="share of the calibration sequences the causal LMs write from prompts (default: "
                        "the library's, RunConfig.generated_share)")
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per domain (SmolLM2)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    calibs, cuts = args.calib.split(","), [float(c) for c in args.cuts.split(",")]
    method = method_config(args.method, args.option)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    share = "the library's default share" if args.calib_generated is None else f"{args.calib_generated:g}"
    written = f" (LMs: {share} of them written by the model from prompts, calibrate/generation.py)"
    method_named = " ".join([args.method, *args.option])
    parts = [f"# Cross-domain quality\n\n`{command}`\n\nCalibration: {args.calib_samples}×{args.calib_len} tokens of "
             f"the named text{written}; method {method_named}, `--budget 1-cut`. SmolLM2: perplexity ratio to "
             f"dense (the dense row: perplexities); MiniLM: embedding cosine to dense. *worst*/*mean*: over the held-out domains "
             f"(all but the calibration text); *worst prose/legal*: the same without Python code. Seconds: the "
             f"compression, calibration included, on a shared 2-core CPU.\n"]
    summary_header = ["worst held-out", "mean held-out", "worst prose/legal", "seconds"]
    lm = lambda name, folder: lambda: lm_rows(name, folder, calibs, cuts, args.calib_samples, args.calib_len,  # noqa: E731
                                              method, args.tokens, args.calib_generated)
    tables = [("smollm2", lm("smollm2", SMOLLM2), "## SmolLM2-135M: perplexity ÷ dense"),
              ("gemma3", lm("gemma3", GEMMA), "## Gemma-3-270m: perplexity ÷ dense"),
              ("minilm", lambda: minilm_rows(calibs, cuts, args.calib_samples, args.calib_len, method),
               "## all-MiniLM-L6-v2: embedding cosine to dense")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, rows_of, title in tables:
        if name not in args.models.split(","):
            continue
        header = ["calib", "cut", *DOMAINS, *summary_header]
        rows = []
        for row in rows_of():
            rows.append(row)
            print(" | ".join(row), flush=True)
            args.out.write_text("\n\n".join(parts + [f"{title}\n\n{markdown(rows, header)}"]) + "\n")
            args.out.with_suffix(".ranks.json").write_text(json.dumps(RANKS))
        parts.append(f"{title}\n\n{markdown(rows, header)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
