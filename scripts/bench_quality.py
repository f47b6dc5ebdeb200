"""Quality of compression methods on real models → benchmarks/quality.md.

SmolLM2-135M: perplexity on the first 4,096 tokens of alice29.txt (1,024-token windows) and,
for the calibrated methods, of lcet10.txt (text of another kind than the calibration text);
calibration on asyoulik.txt. MiniLM: cosine similarity of mean-pooled embeddings to the dense
model on movie-review snippets, and the accuracy of a ridge sentiment probe on them
(vaderSentiment movie snippets, |rating| >= 0.5, 2000 train / 1000 test).

Usage: python scripts/bench_quality.py [--cuts 0.1,0.2,0.3,0.4] [--models smollm2,minilm]
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from prepare_examples import MINILM, SMOLLM2, TEXT, VADER_MOVIES

from lora_compress.calibrate.collectors import FULL_FISHER_MAX
from lora_compress.calibrate.tokens import bos_added, calibration_tokens
from lora_compress.storage.checkpoint import load_dense, load_tokenizer, resolve_source
from lora_compress.pipelines.plan import compress_
from lora_compress.methods.config import CompressConfig
from lora_compress.evaluation.metrics import mean_pool
from lora_compress.storage.text import read_text

OUT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.md"
CALIB, EVAL, OTHER = TEXT / "asyoulik.txt", TEXT / "alice29.txt", TEXT / "lcet10.txt"
# (label, method, rank option): the peer is SVD-LLM with one ratio for every layer
SMOLLM2_METHODS = [("plain SVD, uniform", "svd", "ratio"), ("whiten (SVD-LLM), uniform", "whiten", "ratio"),
                   ("sequential + budget (default)", "sequential", "budget"),
                   ("whiten + budget allocation", "whiten", "budget"), ("sequential, uniform", "sequential", "ratio")]
MINILM_METHODS = [("plain SVD, uniform", "svd", "ratio"), ("whiten (SVD-LLM), uniform", "whiten", "ratio"),
                  ("sequential + budget (default)", "sequential", "budget")]
ABLATIONS = {"whiten + budget allocation", "sequential, uniform"}  # with --ablations, at the first cut


@torch.no_grad()
def perplexity(model, tokenizer, path: Path, max_tokens: int = 4096, window: int = 1024) -> float:
    ids = tokenizer(read_text(path), return_tensors="pt")["input_ids"][0][:max_tokens]
    bos = bos_added(tokenizer)  # a window from the middle of the text starts with BOS, as the model saw in training
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start: start + window].clone().unsqueeze(0)  # (1, T)
        if bos is not None:
            chunk[0, 0] = bos
        logits = model(input_ids=chunk, use_cache=False).logits[0]  # (T, V)
        nll += F.cross_entropy(logits[:-1].float(), chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return float(torch.tensor(nll / count).exp())


def movie_snippets() -> tuple[list[str], torch.Tensor]:
    """Snippets with |rating| >= 0.5 in a seeded order, and their labels (1 positive)."""
    rows = [line.split("\t") for line in VADER_MOVIES.read_text().splitlines() if line.count("\t") >= 2]
    rows = [(float(r[1]), r[2]) for r in rows if abs(float(r[1])) >= 0.5]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:3000].tolist()
    return [rows[i][1] for i in order], torch.tensor([float(rows[i][0] > 0) for i in order])


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    """Mean-pooled embeddings; batches of similar length so little padding is computed."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch):
        rows = order[start: start + batch]
        inputs = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")
        out[rows] = mean_pool(model(**inputs).last_hidden_state.float(), inputs["attention_mask"])
    return out  # (N, C)


def probe_accuracy(embeddings: torch.Tensor, labels: torch.Tensor, train: int = 2000, ridge: float = 1.0) -> float:
    """Ridge regression on ±1 targets over the first ``train`` rows, accuracy on the rest."""
    X = torch.cat([embeddings, torch.ones(len(embeddings), 1)], 1).double()  # (N, C+1)
    y = labels.double() * 2 - 1
    Xt, yt = X[:train], y[:train]
    w = torch.linalg.solve(Xt.T @ Xt + ridge * torch.eye(X.shape[1], dtype=X.dtype), Xt.T @ yt)
    return float(((X[train:] @ w > 0).double() == labels[train:].double()).double().mean())


def compressed(dense, method: str, option: str, keep: float, tokens):
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    config = CompressConfig(method=method, **{option: keep})
    report = compress_(model, config, progress=False, tokens=None if method == "svd" else tokens)
    return model, report, time.perf_counter() - start


def smollm2_rows(cuts, samples, length, dense_row=True, ablations=True):
    """Rows of the SmolLM2 table, yielded as each is measured."""
    source = resolve_source(str(SMOLLM2))
    dense, tokenizer = load_dense(source), load_tokenizer(source)
    tokens = calibration_tokens(tokenizer, read_text(CALIB), samples, length)
    if dense_row:
        yield ["0%", "dense", f"{perplexity(dense, tokenizer, EVAL):.2f}", f"{perplexity(dense, tokenizer, OTHER):.2f}",
               "1.000", "-"]
    for index, cut in enumerate(cuts):
        for label, method, option in SMOLLM2_METHODS:
            if label in ABLATIONS and (index or not ablations):
                continue
            model, report, seconds = compressed(dense, method, option, 1 - cut, tokens)
            other = f"{perplexity(model, tokenizer, OTHER):.2f}" if method != "svd" else "-"
            yield [f"{cut:.0%}", label, f"{perplexity(model, tokenizer, EVAL):.2f}", other,
                   f"{report.params / report.dense_params:.3f}", f"{seconds:.0f}"]


def minilm_rows(cuts, samples, length, dense_row=True, ablations=True):
    """Rows of the MiniLM table, yielded as each is measured."""
    source = resolve_source(str(MINILM))
    dense, tokenizer = load_dense(source), load_tokenizer(source)
    tokens = calibration_tokens(tokenizer, read_text(CALIB), samples, length)
    texts, labels = movie_snippets()
    reference = embed(dense, tokenizer, texts)
    if dense_row:
        yield ["0%", "dense", "1.0000", f"{probe_accuracy(reference, labels):.3f}", "1.000", "-"]
    for cut in cuts:
        for label, method, option in MINILM_METHODS:
            model, report, seconds = compressed(dense, method, option, 1 - cut, tokens)
            emb = embed(model, tokenizer, texts)
            yield [f"{cut:.0%}", label, f"{float((emb * reference).sum(-1).mean()):.4f}",
                   f"{probe_accuracy(emb, labels):.3f}", f"{report.params / report.dense_params:.3f}", f"{seconds:.0f}"]


def markdown(rows, header) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", default="0.1,0.2,0.3,0.4", help="fractions of targeted parameters removed")
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense rows")
    parser.add_argument("--only", help="run only the methods whose label contains this text")
    parser.add_argument("--ablations", action="store_true", help="also the ablation rows, at the first cut")
    args = parser.parse_args()
    torch.manual_seed(0)
    cuts = [float(c) for c in args.cuts.split(",")]
    if args.only:
        SMOLLM2_METHODS[:] = [m for m in SMOLLM2_METHODS if args.only in m[0]]
        MINILM_METHODS[:] = [m for m in MINILM_METHODS if args.only in m[0]]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    parts = [f"# Compression quality\n\n`{command}`\n\nCalibration: {args.calib_samples}×{args.calib_len} tokens of "
             f"asyoulik.txt. Cut = fraction of the targeted linear weights removed; kept = measured fraction "
             f"kept; seconds = wall time of compression (calibration included) on a shared 2-core CPU.\n\n"
             f"Methods: *plain SVD* truncates W; *whiten* is SVD-LLM's closed form (SVD of W·L, L Lᵀ = XᵀX of "
             f"the dense model's inputs); *sequential* compresses block by block, whitening each layer with "
             f"the inputs of the already compressed model and weighting its rows by the output-gradient "
             f"second moments (SVD of Rᵀ·W·L, R·Rᵀ = F + damping, F = covariance of the calibration loss's "
             f"gradient at the layer's outputs; its diagonal past {FULL_FISHER_MAX} outputs). *uniform* = "
             f"the same ratio in every layer; *budget* = ranks per layer from the Fisher-weighted whitened "
             f"truncation loss Σ_(i>r) σ_i²(Rᵀ·W·L), traded across layers by Lagrangian relaxation plus a "
             f"greedy fill.\n"]
    tables = [("smollm2", smollm2_rows, "## SmolLM2-135M: perplexity (first 4,096 tokens, 1,024-token windows)",
               ["cut", "method", "alice29 ppl", "lcet10 ppl", "kept", "seconds"]),
              ("minilm", minilm_rows, "## all-MiniLM-L6-v2: embeddings of movie-review snippets",
               ["cut", "method", "cosine to dense", "probe accuracy", "kept", "seconds"])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, rows_of, title, header in tables:
        if name not in args.models:
            continue
        rows = []
        for row in rows_of(cuts, args.calib_samples, args.calib_len, not args.no_dense, args.ablations):
            rows.append(row)
            print(" | ".join(row), flush=True)
            args.out.write_text("\n\n".join(parts + [f"{title}\n\n{markdown(rows, header)}"]) + "\n")
        parts.append(f"{title}\n\n{markdown(rows, header)}")
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
