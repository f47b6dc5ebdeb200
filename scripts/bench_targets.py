"""Compression to a quality target: SmolLM2 cut to a mean next-token loss rise of X nats → a markdown table.

For each target X (``--max-loss-rise X``, calibrated on one text): the parameters kept, the rise the costs
predicted and the rise measured on the held-out calibration sequences (every try, when the target was
tightened), and the rise on other domains: ln(perplexity compressed / perplexity dense) on the first 4,096
tokens of each domain's evaluation file (bench_domains.DOMAINS; 1,024-token windows, as bench_quality).

Usage: python scripts/bench_targets.py --targets 0.1,0.2,0.4 --calib asyoulik --out benchmarks/targets.md
       (or one process per target, --out FILE_X.md each, then --collect FILE_X.json ... --out FILE.md)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from bench_domains import DOMAINS, calib_path
from bench_quality import markdown, perplexity
from prepare_examples import SMOLLM2, TEXT

from lora_compress.calibrate.tokens import calibration_tokens
from lora_compress.methods.config import CompressConfig, RunConfig
from lora_compress.pipelines.plan import compress_
from lora_compress.storage.checkpoint import load_dense, load_tokenizer, resolve_source
from lora_compress.storage.text import read_text

OTHER = ("alice29", "lcet10", "python", "legal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.1,0.2,0.4", help="loss rises in nats, comma-separated")
    parser.add_argument("--calib", default="asyoulik")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--method", default="sequential")
    parser.add_argument("--tokens", type=int, default=4096, help="evaluation tokens per domain")
    parser.add_argument("--collect", nargs="+", type=Path, help="only render the rows of these runs' .json files")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.collect:
        found = {key: value for path in args.collect for key, value in json.loads(path.read_text()).items()}
        commands = [value["command"] for value in found.values()]
        write(args.out, commands + [command], args, [row(float(t), r) for t, r in found.items()], found)
        return
    source = resolve_source(str(SMOLLM2))
    dense, tokenizer = load_dense(source), load_tokenizer(source)
    texts = {d: TEXT / DOMAINS[d] for d in OTHER}
    with torch.no_grad():
        base = {d: perplexity(dense, tokenizer, p, args.tokens) for d, p in texts.items()}
    calib = str(calib_path(args.calib))
    tokens = calibration_tokens(tokenizer, read_text(calib), args.calib_samples, args.calib_len)
    rows, found = [], {}
    for target in [float(t) for t in args.targets.split(",")]:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = compress_(model, CompressConfig(max_loss_rise=target, method=args.method), RunConfig(calib=calib),
                           tokens=tokens, progress=False)
        seconds = time.perf_counter() - start
        result = report.calibration["loss_target"]
        with torch.no_grad():
            rises = {d: math.log(perplexity(model, tokenizer, p, args.tokens) / base[d]) for d, p in texts.items()}
        found[str(target)] = {**result, "params": report.params, "dense_params": report.dense_params,
                              "domain_rise": rises, "seconds": seconds, "command": command,
                              "ranks": {layer.name: layer.rank for layer in report.layers}}
        rows.append(row(target, found[str(target)]))
        print(" | ".join(rows[-1]), flush=True)
        write(args.out, [command], args, rows, found)
        del model
    print(f"wrote {args.out}")


HEADER = ["target (nats)", "params kept", "predicted", "measured (held out)", "tries: predicted → measured (kept)",
          *[f"{d} rise" for d in OTHER], "seconds"]


def row(target: float, found: dict) -> list[str]:
    """One target's table row from what its run recorded."""
    dense = found["dense_params"]
    tries = "; ".join(f"{t['predicted']:.3f} → {t['measured']:.3f} ({t['params'] / dense:.1%})" for t in found["tries"])
    return [f"{target:g}", f"{found['params'] / dense:.1%}", f"{found['predicted']:.3f}", f"{found['measured']:.3f}",
            tries, *[f"{found['domain_rise'][d]:.3f}" for d in OTHER], f"{found['seconds']:.0f}"]


def write(out: Path, commands: list[str], args, rows: list[list[str]], found: dict) -> None:
    """The markdown table (and the runs' figures as .json beside it)."""
    first = next(iter(found.values()))
    text = ("# Compression to a quality target\n\n" + "".join(f"`{c}`\n\n" for c in commands) +
            f"SmolLM2-135M-Instruct, method {args.method}, calibrated on {args.calib_samples}×{args.calib_len} tokens "
            f"of {args.calib}, of which 1 in 8 sequences ({first['held_out_sequences']}, {first['held_out_tokens']} "
            f"predicted tokens) are held out of the statistics to measure the rise on. *params kept*: targeted "
            f"weights kept; *predicted*: Σ cost / 2N (methods/ranks.predicted_rise) of the final cut; *measured*: "
            f"mean next-token loss rise on the held-out sequences; *tries*: each compression (the target is "
            f"tightened when the measured rise is over it), predicted → measured (params kept); *domain rise*: "
            f"ln(perplexity ratio to dense) on the first {args.tokens} tokens of each other domain. Seconds: the "
            f"whole compression (every try) on a shared, heavily loaded 2-core CPU (other jobs running).\n\n"
            f"{markdown(rows, HEADER)}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
