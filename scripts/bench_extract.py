"""Benchmark: extracting a real fine-tune as a LoRA, against PEFT's and mergekit's SVD paths.

The fine-tune is SmolLM2-135M-Instruct trained with PEFT LoKr on movie reviews
(``scripts/make_finetune.py``). At each rank, three ways to factor the same deltas:

- lora-compress: ``factor_deltas`` (randomized SVD below half the smaller dimension, else full),
  and the activation-aware variant calibrated on asyoulik.txt (``--calib``)
- PEFT: ``convert_to_lora`` on the LoKr PeftModel (get_delta_weight + full SVD per layer)
- mergekit-extract-lora's algorithm: full ``torch.linalg.svd`` of each dense delta, truncated

Each adapter is merged into a copy of the base and compared with the tuned model on the first
512 tokens of alice29.txt (text of another kind than the fine-tune's): relative Frobenius
error of the logits, KL(tuned ‖ candidate) per token, and the share of the fine-tune's own
logit change that the adapter recovers (1 − error / error of the base alone).

Usage: ``python scripts/bench_extract.py [--ranks 8 32]`` → benchmarks/extract.md
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_finetune import FINETUNE, LOKR_ADAPTER  # noqa: E402
from prepare_examples import SMOLLM2, TEXT  # noqa: E402

from lora_compress.calibrate.collectors import InputGram, forward_statistics  # noqa: E402
from lora_compress.calibrate.tokens import calibration_tokens  # noqa: E402
from lora_compress.storage.checkpoint import load_dense, resolve_source  # noqa: E402
from lora_compress.export.extract import ExtractConfig, factor_deltas, model_deltas  # noqa: E402
from lora_compress.export.peft_format import merge_  # noqa: E402
from lora_compress.report.tables import render  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "extract.md"
EVAL_TOKENS = 512


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()[0]  # (T, V)


def drift(got: torch.Tensor, want: torch.Tensor, base_error: float | None = None) -> dict:
    error = float((got - want).norm() / want.norm())
    kl = float(torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1), log_target=True,
                                          reduction="batchmean"))
    recovered = None if base_error is None else 1 - error / base_error
    return {"error": error, "kl": kl, "recovered": recovered}


def mergekit_factors(weights: dict, rank: int) -> dict:
    """mergekit-extract-lora's core: full SVD of the dense delta, keep the top ``rank`` triplets."""
    factors = {}
    for name, delta in weights.items():
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(S))
        factors[name] = (U[:, :r] * S[:r], Vh[:r])  # (out, r), (r, in)
    return factors


def peft_factors(rank: int) -> tuple[dict, float]:
    """PEFT's convert_to_lora on the LoKr model; returns (factors, seconds of the conversion)."""
    from peft import PeftModel
    from peft.tuners.lora.conversion import convert_to_lora
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32), LOKR_ADAPTER)
    start = time.perf_counter()
    config, state = convert_to_lora(model, rank)
    seconds = time.perf_counter() - start
    pairs = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        pairs.setdefault(match[1], {})[match[2]] = tensor
    return {name: (p["B"], p["A"]) for name, p in pairs.items()}, seconds


def measure(base, factors: dict, ids, want, base_error) -> dict:
    candidate = merge_(copy.deepcopy(base), factors)
    return drift(logits(candidate, ids), want, base_error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--calib-samples", type=int, default=8)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    base, tuned = load_dense(resolve_source(str(SMOLLM2))), load_dense(resolve_source(str(FINETUNE)))
    ids = tokenizer((TEXT / "alice29.txt").read_text(), return_tensors="pt")["input_ids"][:, :EVAL_TOKENS]
    want = logits(tuned, ids)
    reference = drift(logits(base, ids), want)
    deltas = model_deltas(base, tuned)
    weights = deltas.weights
    dense_params = sum(w.numel() for w in weights.values())
    calib = calibration_tokens(tokenizer, (TEXT / "asyoulik.txt").read_text(), args.calib_samples, 256)
    start = time.perf_counter()
    stats = forward_statistics(tuned, calib, {n: tuned.get_submodule(n) for n in weights},
                               (InputGram(every_layer=True),), progress=False)
    grams = lambda name: stats[name]["gram"]  # noqa: E731
    calib_seconds = time.perf_counter() - start
    rows = [["base alone (no adapter)", 0, 0, "-", reference["error"], reference["kl"], 0.0]]
    for rank in args.ranks:
        config = ExtractConfig(rank=rank)
        runs = []
        start = time.perf_counter()
        ours = factor_deltas(weights, config, progress=False)[0]
        runs.append(("lora-compress extract", ours, time.perf_counter() - start))
        start = time.perf_counter()
        aware = factor_deltas(weights, config, grams, progress=False)[0]
        runs.append(("lora-compress extract --calib (whitened)", aware, time.perf_counter() - start + calib_seconds))
        start = time.perf_counter()
        runs.append(("mergekit-extract-lora algorithm (full SVD)", mergekit_factors(weights, rank),
                     time.perf_counter() - start))
        peft, seconds = peft_factors(rank)
        runs.append(("PEFT convert_to_lora (LoKr model)", peft, seconds))
        for label, factors, seconds in runs:
            pairs = {n: (f.B, f.A) for n, f in factors.items()} if label.startswith("lora-compress") else factors
            params = sum(B.numel() + A.numel() for B, A in pairs.values())
            figures = measure(base, pairs, ids, want, reference["error"])
            rows.append([label, rank, params, seconds, figures["error"], figures["kl"], figures["recovered"]])
            print(rows[-1], flush=True)
        write(rows, dense_params, len(weights), calib_seconds, args)  # after each rank: partial runs keep rows
    full = factor_deltas(weights, ExtractConfig(rank=100_000), progress=False)[0]
    figures = measure(base, {n: (f.B, f.A) for n, f in full.items()}, ids, want, reference["error"])
    rows.append(["lora-compress extract (full rank)", "min(m,n)", sum(f.B.numel() + f.A.numel() for f in full.values()),
                 "-", figures["error"], figures["kl"], figures["recovered"]])
    write(rows, dense_params, len(weights), calib_seconds, args)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write(rows, dense_params: int, layers: int, calib_seconds: float, args) -> None:
    header = ["method", "rank", "adapter params", "factoring s", "logits rel. error", "KL per token",
              "fine-tune change recovered"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    ranks = " ".join(map(str, args.ranks))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(f"""# Extracting a fine-tune as a LoRA adapter

Command: `python scripts/bench_extract.py --ranks {ranks} --calib-samples {args.calib_samples}`
(after `python scripts/prepare_examples.py` and `python scripts/make_finetune.py`)

Fine-tune: SmolLM2-135M-Instruct, PEFT LoKr (r=8) on all 7 linear layer types of 30 blocks, trained
on movie-review snippets; {layers} changed layers, {dense_params:,} delta weights. Evaluation: first
{EVAL_TOKENS:,} tokens of alice29.txt; every candidate is base + adapter merged, compared with the tuned
model. "Factoring s" is the SVD work alone (whitened: plus {calib_seconds:.1f} s of calibration on
{args.calib_samples}×256 tokens of asyoulik.txt); PEFT's figure is its `convert_to_lora` call. Model loading,
the output check and writing are not timed. 2 shared CPU threads: compare times within this table only.

{chr(10).join(table)}
""")
    print(render([[_cell(c) for c in row] for row in rows], header))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
