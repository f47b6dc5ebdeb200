"""Benchmark: ``lora-compress extract`` against the real ``mergekit-extract-lora``, side by side.

The fine-tune is SmolLM2-135M-Instruct trained with PEFT LoKr on movie reviews
(``scripts/make_finetune.py``). At each rank both commands run as a user runs them, one after the
other, each under ``/usr/bin/time -v``:

    mergekit-extract-lora --model TUNED --base-model BASE --out-path DIR --max-rank R
    lora-compress extract --base BASE --tuned TUNED --out DIR --rank R --quiet

and each adapter folder is then loaded with PEFT (``PeftModel.from_pretrained`` + ``merge_and_unload``)
onto the base and compared with the tuned model:

- weight error: ‖W_merged − W_tuned‖ / ‖W_tuned − W_base‖ (Frobenius, summed over the changed linear layers):
  the share of the fine-tune's change that the adapter misses (0 = exact, 1 = the base alone);
- perplexity on the first 1,024 tokens of alice29.txt (held out: text of another kind) and of
  movie_reviews.txt (the fine-tune's own domain).

Needs mergekit (``pip install 'lora-compress[bench]'``). Usage:
``python scripts/bench_extract.py [--ranks 8 32 128]`` → benchmarks/extract.md
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_finetune import FINETUNE  # noqa: E402
from prepare_examples import SMOLLM2, TEXT  # noqa: E402

from lora_compress.report.tables import render  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "extract.md"
PPL_TOKENS = 1024
TEXTS = ("alice29.txt", "movie_reviews.txt")
TIME_FIELDS = {"wall": r"Elapsed \(wall clock\) time.*: (.+)", "user": r"User time \(seconds\): (.+)",
               "sys": r"System time \(seconds\): (.+)", "rss_kb": r"Maximum resident set size \(kbytes\): (.+)"}


def tool(name: str) -> str:
    """The path of a console script, or exit with the command that installs it."""
    found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} is not installed; pip install 'lora-compress[bench]' (mergekit) and run again")
    return found


def _seconds(clock: str) -> float:
    """``h:mm:ss`` or ``m:ss.cc`` as seconds."""
    parts = [float(part) for part in clock.strip().split(":")]
    return sum(value * 60 ** power for power, value in enumerate(reversed(parts)))


def timed(command: list[str]) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``: wall and CPU seconds, peak resident memory (GiB)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}  # this checkout's lora_compress
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    found = {key: re.search(pattern, result.stderr) for key, pattern in TIME_FIELDS.items()}
    return {"wall": _seconds(found["wall"][1]), "cpu": float(found["user"][1]) + float(found["sys"][1]),
            "peak_gib": int(found["rss_kb"][1]) / 2**20}


def changed_layers(base, tuned) -> list[str]:
    """Names of the linear layers whose weight the fine-tune changed."""
    tuned_modules = dict(tuned.named_modules())
    return [name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)
            and not torch.equal(module.weight, tuned_modules[name].weight)]


def weight_error(merged, base, tuned, layers: list[str]) -> float:
    """‖W_merged − W_tuned‖ / ‖W_tuned − W_base‖ over ``layers`` (Frobenius)."""
    missed = change = 0.0
    for name in layers:
        want = tuned.get_submodule(name).weight.double()
        missed += float((merged.get_submodule(name).weight.double() - want).square().sum())
        change += float((want - base.get_submodule(name).weight.double()).square().sum())
    return (missed / change) ** 0.5


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    return float(torch.exp(model(input_ids=ids, labels=ids).loss))


def adapter_size(folder: Path) -> tuple[int, int]:
    """(parameters, bytes) of an adapter folder's weights files."""
    from safetensors import safe_open

    params = size = 0
    for path in folder.glob("*.safetensors"):
        size += path.stat().st_size
        with safe_open(path, "pt") as tensors:
            for key in tensors.keys():
                shape = tensors.get_slice(key).get_shape()
                params += int(torch.tensor(shape).prod()) if shape else 1
    return params, size


def merged_with(base, folder: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).merge_and_unload().eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench-extract",
                        help="where the adapters and each run's timing stay")
    parser.add_argument("--reuse", action="store_true", help="evaluate adapters (and timings) already in --work")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    commands = {
        "mergekit-extract-lora": lambda out, rank: [tool("mergekit-extract-lora"), "--model", str(FINETUNE),
                                                    "--base-model", str(SMOLLM2), "--out-path", str(out),
                                                    "--max-rank", str(rank)],
        "lora-compress extract": lambda out, rank: [tool("lora-compress"), "extract", "--base", str(SMOLLM2),
                                                    "--tuned", str(FINETUNE), "--out", str(out), "--rank",
                                                    str(rank), "--quiet"]}
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    base = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(FINETUNE, dtype=torch.float32).eval()
    layers = changed_layers(base, tuned)
    ids = {name: tokenizer((TEXT / name).read_text(), return_tensors="pt")["input_ids"][:, :PPL_TOKENS]
           for name in TEXTS}
    rows = [["base alone (no adapter)", 0, "-", "-", "-", "-", "-", 1.0, *(perplexity(base, i) for i in ids.values())],
            ["tuned model", "-", "-", "-", "-", "-", "-", 0.0, *(perplexity(tuned, i) for i in ids.values())]]
    for rank in args.ranks:
        for label, command in commands.items():
            out = args.work / f"{label.split()[0]}-{rank}"
            timing = out.with_name(out.name + ".time.json")
            if not (args.reuse and timing.is_file()):
                shutil.rmtree(out, ignore_errors=True)
                args.work.mkdir(parents=True, exist_ok=True)
                timing.write_text(json.dumps(timed(command(out, rank))))
            run = json.loads(timing.read_text())
            params, size = adapter_size(out)
            merged = merged_with(base, out)
            rows.append([label, rank, run["wall"], run["cpu"], run["peak_gib"], params, size / 2**20,
                         weight_error(merged, base, tuned, layers), *(perplexity(merged, i) for i in ids.values())])
            print(rows[-1], flush=True)
            del merged
        write(rows, layers, args, args.ranks[:args.ranks.index(rank) + 1])  # a partial run keeps its rows


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write(rows, layers: list[str], args, ranks: list[int]) -> None:
    header = ["command", "rank", "wall s", "CPU s", "peak GiB", "adapter params", "adapter MiB",
              "weight error", *(f"ppl {name.removesuffix('.txt')}" for name in TEXTS)]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    import mergekit
    import peft

    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(f"""# Extracting a fine-tune as a LoRA adapter: lora-compress against mergekit

Command: `python scripts/bench_extract.py --ranks {' '.join(map(str, ranks))}`
(after `python scripts/prepare_examples.py`, `python scripts/make_finetune.py` and `pip install -e '.[bench]'`;
mergekit {getattr(mergekit, '__version__', '0.1.5')}, PEFT {peft.__version__})

Fine-tune: SmolLM2-135M-Instruct, PEFT LoKr (r=8) on all 7 linear layer types of 30 blocks, trained on
movie-review snippets; {len(layers)} changed linear layers. Each command runs whole, as a user types it
(loading, SVD, writing), under `/usr/bin/time -v`: wall seconds, CPU seconds (user + system) and peak
resident memory. Each adapter folder is then loaded with PEFT onto the base and merged. Weight error:
‖W_merged − W_tuned‖ / ‖W_tuned − W_base‖ over the changed layers (Frobenius; 0 = the fine-tune exactly,
1 = the base alone). Perplexity: first {PPL_TOKENS:,} tokens of alice29.txt (held out) and of movie_reviews.txt
(the fine-tune's training domain). mergekit also saves the untouched `lm_head` and norms whole
(modules_to_save), hence its larger adapter. Shared 2-core machine, loaded by other jobs: compare times
within this table only; CPU seconds are the steadier figure.

{chr(10).join(table)}
""")
    print(render([[_cell(c) for c in row] for row in rows], header))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
