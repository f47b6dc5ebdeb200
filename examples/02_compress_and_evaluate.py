"""Compress a real model from Python and measure what it cost.

Cuts 20% of SmolLM2-135M's linear weights (``budget=0.8``: the activation-aware default, calibrated on
As You Like It), writes the folder, then compares it with the dense model on held-out text (Alice).
Prints the parameters kept, the folder's bytes against the dense checkpoint's, and perplexity dense
against compressed. It took 400 CPU-seconds here (8×128 calibration tokens; the CLI default is 32×256).

    python examples/02_compress_and_evaluate.py [--model FOLDER] [--out FOLDER]
"""
import argparse
import sys
from pathlib import Path

import lora_compress as lc

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=".cache/models/SmolLM2-135M-Instruct")
parser.add_argument("--calib", default=".cache/text/asyoulik.txt", help="calibration text")
parser.add_argument("--text", default=".cache/text/alice29.txt", help="held-out text to evaluate on")
parser.add_argument("--out", default="out/examples/smollm2-80")
parser.add_argument("--calib-samples", type=int, default=8)
parser.add_argument("--calib-len", type=int, default=128)
args = parser.parse_args()
for path in (args.model, args.calib, args.text):
    if not Path(path).exists():
        print(f"{path} is missing; prepare it with: python scripts/prepare_examples.py")
        sys.exit(2)

config = lc.CompressConfig(budget=0.8)  # what to do: keep 80% of the targeted weights, ranks per layer
run = lc.RunConfig(calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len)  # how this run goes
report = lc.compress(args.model, args.out, config, run, force=True)
print(f"wrote {args.out}: {sum(layer.rank is not None for layer in report.layers)} of {len(report.layers)} "
      f"layers factored, {report.params / report.dense_params:.1%} of the targeted weights kept")

figures = lc.evaluate_folder(args.model, args.out, args.text, config=lc.EvalConfig(max_tokens=1024))
print(f"whole model: {figures['params']['ratio_total']:.1%} of the parameters, "
      f"{figures['disk']['ratio']:.1%} of the bytes on disk")
if "perplexity" in figures:  # a causal LM
    ppl = figures["perplexity"]
    print(f"perplexity on {Path(args.text).name}: dense {ppl['dense']:.2f}, compressed {ppl['compressed']:.2f} "
          f"({ppl['compressed'] / ppl['dense']:.2f}× dense)")
