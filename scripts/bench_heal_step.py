"""``compress --heal``: what healing buys per domain, and the learning-rate sweep behind its default.

Starts from a compressed folder (SmolLM2-135M, ``--budget 0.8 --calib asyoulik.txt``) and its calibration tokens,
rebuilt exactly as the compress job made them (jobs/compress.calibration_batch with the manifest's RunConfig), then
runs the very step ``compress --heal`` runs (jobs/heal_step.heal_compressed) and measures perplexity on each
domain of bench_domains.py before and after, as a ratio to dense.

Usage: python scripts/bench_heal_step.py sweep --folder out/smol20 --lrs 1e-4,3e-4,1e-3 --minutes 2
       python scripts/bench_heal_step.py heal --folder out/smol20 --minutes 15 [--lr 3e-4]
Each writes a JSON under .cache/bench/heal_step/; ``report`` renders them as markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench_domains import DOMAINS, TEXT, dense_figures
from bench_quality import perplexity
from prepare_examples import CACHE, SMOLLM2

import lora_compress as lc
from lora_compress.calibrate.tokens import read_calibration_text
from lora_compress.jobs.compress import calibration_batch
from lora_compress.jobs.heal_step import heal_compressed
from lora_compress.methods.config import RunConfig
from lora_compress.storage.checkpoint import Source, load_dense, load_tokenizer, resolve_source
from lora_compress.storage.compressed import read_manifest

EVAL = [d for d in DOMAINS if d != "asyoulik"]  # held-out domains (the calibration text is asyoulik)
RESULTS = CACHE / "bench" / "heal_step"
TOKENS_EVAL = 4096


def ratios(model, tokenizer, base: dict) -> dict[str, float]:
    return {d: perplexity(model, tokenizer, TEXT / DOMAINS[d], TOKENS_EVAL) / base[d] for d in DOMAINS}


def setup(folder: Path):
    manifest = read_manifest(folder)
    run = RunConfig.from_dict(manifest.run)
    source = resolve_source(str(SMOLLM2))
    tokenizer = load_tokenizer(source)
    tokens = calibration_batch(tokenizer, read_calibration_text(run.calib), run)
    dense = load_dense(source)
    base = dense_figures(f"smollm2/{TOKENS_EVAL}",
                         lambda: {d: perplexity(dense, tokenizer, TEXT / f, TOKENS_EVAL) for d, f in DOMAINS.items()})
    del dense
    return run, source, tokenizer, tokens, base


def heal_once(folder: Path, run: RunConfig, source: Source, tokenizer, tokens, base, minutes: float, lr: float | None,
              before: dict | None = None):
    model = lc.load(folder)
    before = ratios(model, tokenizer, base) if before is None else before  # {}: held-out calibration loss only
    start = time.perf_counter()
    healing = heal_compressed(model, source, tokens, tokenizer, RunConfig(**{**run.to_dict(), "heal_minutes": minutes,
                                                                             "heal_lr": lr}), progress=False)
    seconds = time.perf_counter() - start
    after = ratios(model, tokenizer, base) if before else None
    return {"minutes": minutes, "lr": healing["settings"]["lr"], "before": before, "after": after,
            "seconds": seconds, "load": os.getloadavg(), "healing": {k: v for k, v in healing.items() if k != "history"},
            "curve": healing["history"][:: max(1, len(healing["history"]) // 20)]}


def save(name: str, result) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def row(label: str, result: dict, key: str) -> str:
    figures = result[key]
    worst = max(EVAL, key=figures.get)
    mean = sum(figures[d] for d in EVAL) / len(EVAL)
    return " | ".join([label, *[f"{figures[d]:.3f}" for d in DOMAINS], f"{figures[worst]:.3f} ({worst})",
                       f"{mean:.3f}"])


def report() -> None:
    header = "| | " + " | ".join(DOMAINS) + " | worst held-out | mean held-out |\n|" + "---|" * (len(DOMAINS) + 3)
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        results = result if isinstance(result, list) else [result]
        print(f"### {path.stem}\n")
        if results[0]["before"]:
            print(header)
            print("| " + row("before", results[0], "before") + " |")
            for r in results:
                h = r["healing"]
                print("| " + row(f"after, lr {r['lr']:g}, {h['steps']} steps in {h['minutes']:.1f} min", r, "after")
                      + " |")
        for r in results:
            h = r["healing"]
            print(f"\n- lr {r['lr']:g}, {h['steps']} steps in {h['minutes']:.1f} min: held-out calibration loss {h['held_out_before']:.4f} → "
                  f"{h['held_out_after']:.4f} (kept: {h['kept']}); {h['tokens_seen']:,} training tokens seen "
                  f"(a set of {h['tokens']['train']:,}, {h['generation_minutes']:.1f} min writing "
                  f"{h['written']} teacher sequences); whole step {r['seconds'] / 60:.1f} min; "
                  f"load average {', '.join(f'{x:.1f}' for x in r['load'])}")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["sweep", "heal", "report"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    if args.mode == "report":
        return report()
    run, source, tokenizer, tokens, base = setup(args.folder)
    if args.mode == "sweep":
        before = {}  # the sweep compares the held-out calibration loss alone (no time for perplexities)
        results = [heal_once(args.folder, run, source, tokenizer, tokens, base, args.minutes, float(lr), before)
                   for lr in args.lrs.split(",")]
        print(save(f"sweep{args.tag}", results))
    else:
        print(save(f"heal-{args.minutes:g}min{args.tag}", heal_once(args.folder, run, source, tokenizer, tokens,
                                                                     base, args.minutes, args.lr)))
    print(" ".join(sys.argv))


if __name__ == "__main__":
    main()
