"""Calibrated compression at the sizes people deploy → benchmarks/scale.md.

For each model, the default good path `lora-compress compress MODEL --budget 0.8 --calib asyoulik.txt`
(default calibration size, 32×256 tokens) runs as its own process, in memory and streamed (--stream);
the table gives its peak RSS (the process and its children, sampled every 50 ms), wall time, the
report's time split, and the estimate jobs/memory.py made before compute. In the same run a plain
forward+backward pass over the same calibration tokens (the model's own loss, activation gradients
only, in the compute dtype) is timed as the reference the ratios are quoted against.

Models: SmolLM2-135M (real; its alice29 perplexity too) and random-weight bf16 checkpoints shaped like
Qwen2-1.5B, Llama-3-8B and Llama-3-70B (scripts/make_scale_checkpoints.py; random weights: time and
memory only). The Llama shapes run as checkpoints of their first --blocks blocks (all other shapes
equal) when --blocks is given, and the figures for all their blocks (32, 80) are extrapolated from two
such runs. ``--estimate-only NAME`` gives, for that model, jobs/memory.py's estimates alone (no run).

Usage: python scripts/bench_scale.py [--models smollm2,qwen2-1.5b,llama3-8b,llama3-70b] [--modes memory,stream]
                                     [--blocks 2,4] [--estimate-only llama3-70b] [--out benchmarks/scale.md]
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_scale_checkpoints import BLOCKS, make  # noqa: E402
from prepare_examples import SMOLLM2, TEXT  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "scale.md"
CALIB = TEXT / "asyoulik.txt"
EVAL = TEXT / "alice29.txt"
GIB = 1 << 30


def run_measured(command: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the process tree, output) of ``command``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, root = [0], psutil.Process(process.pid)

    def sample():
        while process.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{shlex.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return time.perf_counter() - start, peak[0], output


PLAIN_PASS = """
import sys, time, torch
from lora_compress.calibrate.block_source import ResidentBlocks
from lora_compress.calibrate.loss import model_loss
from lora_compress.calibrate.tokens import batches, calibration_tokens, read_calibration_text
from lora_compress.calibrate.forward import forward
from lora_compress.storage.checkpoint import load_dense, load_tokenizer, resolve_source
source = resolve_source(sys.argv[1])
model, tokenizer = load_dense(source), load_tokenizer(source)
dtype = ResidentBlocks(model).dtype
model.to(dtype).requires_grad_(False)
tokens = calibration_tokens(tokenizer, read_calibration_text(sys.argv[2]), 32, 256)
embeddings = model.get_input_embeddings()
embeddings.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
start, generator = time.perf_counter(), torch.Generator().manual_seed(0)
for ids in batches(tokens):
    model_loss(forward(model, ids), ids, generator).backward()
print(f"PLAIN {time.perf_counter() - start:.1f}")
"""


def plain_pass(model: Path) -> tuple[float, int]:
    """Seconds and peak RSS of one forward+backward over the calibration tokens (activation gradients only)."""
    seconds, peak, output = run_measured([sys.executable, "-c", PLAIN_PASS, str(model), str(CALIB)])
    return float(output.rsplit("PLAIN ", 1)[1].split()[0]), peak


def compress_run(model: Path, out: Path, stream: bool) -> dict:
    command = [str(Path(sys.executable).with_name("lora-compress")), "compress", str(model), "--budget", "0.8",
               "--calib", str(CALIB), "--out", str(out), "--force", "--quiet"] + (["--stream"] if stream else [])
    seconds, peak, output = run_measured(command)
    manifest = json.loads((out / "lora_compress.json").read_text())
    return {"seconds": seconds, "peak": peak, "stages": manifest["calibration"]["seconds_by_stage"],
            "streamed_note": "streaming block by block instead" in output, "command": shlex.join(command[1:])}


def estimate(model: Path, stream: bool, blocks: int | None = None) -> int:
    """jobs/memory.py's estimate for ``model``, or for its shapes with ``blocks`` blocks (a skeleton on meta)."""
    import copy

    from lora_compress import CompressConfig, RunConfig
    from lora_compress.core.targets import find_targets
    from lora_compress.jobs import memory
    from lora_compress.pipelines.plan import Plan
    from lora_compress.storage.checkpoint import model_class, resolve_source
    from lora_compress.stream.lazy import open_lazily, parameters_on_meta

    plan = Plan.make(CompressConfig(budget=0.8), RunConfig(calib=str(CALIB)))
    checkpoint = open_lazily(resolve_source(str(model)), plan.config)
    skeleton, targets = checkpoint.model, checkpoint.targets
    if blocks is not None:
        hf_config = copy.deepcopy(skeleton.config)
        hf_config.num_hidden_layers = blocks
        with parameters_on_meta():
            skeleton = model_class(hf_config)._from_config(hf_config, dtype=checkpoint.dtype).eval()
        targets = find_targets(skeleton)
    found = memory.estimate(skeleton, plan, targets, checkpoint.dtype)
    return found.streamed if stream else found.in_memory


def extrapolated(label: str, mode: str, runs: list[tuple[int, int, dict, float]], blocks: int,
                 model: Path) -> list[str]:
    """A row for ``blocks`` blocks, straight through two runs (blocks, checkpoint bytes, run, plain seconds):
    seconds, the checkpoint and (in memory) the peak above it grow linearly with the blocks; a streamed
    run holds one block whatever their count, so its peak is the larger of the two measured."""
    (b1, size1, run1, plain1), (b2, size2, run2, plain2) = runs

    def line(first, second):
        return first + (second - first) * (blocks - b1) / (b2 - b1)

    size = line(size1, size2)
    seconds, plain = line(run1["seconds"], run2["seconds"]), line(plain1, plain2)
    peak = size + line(run1["peak"] - size1, run2["peak"] - size2) if mode == "memory" else \
        max(run1["peak"], run2["peak"])
    stages = {k: line(run1["stages"].get(k, 0), v) for k, v in run2["stages"].items()}
    run = {"seconds": seconds, "peak": peak, "stages": stages}
    return row(label, mode, int(size), run, plain, estimate(model, mode == "stream", blocks))


def estimate_rows(label: str, model: Path, modes: list[str], blocks: int) -> list[list[str]]:
    """Rows of jobs/memory.py's estimate alone for ``model``'s shapes with ``blocks`` blocks (nothing run)."""
    rows = []
    for mode in modes:
        guess = estimate(model, mode == "stream", blocks)
        rows.append([f"{label}, {blocks} blocks (estimate only, not run)", mode, "-", "-", "-",
                     f"{guess / GIB:.2f}", "-", "-", "-"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def perplexity(model: Path, folder: Path) -> float:
    output = subprocess.run([str(Path(sys.executable).with_name("lora-compress")), "evaluate", str(model),
                             str(folder), "--text", str(EVAL), "--quiet", "--no-report"], capture_output=True,
                            text=True, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("perplexity"))
    return float(line.split()[2])


def checkpoint_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def truncated(name: str, blocks: int) -> Path:
    """The checkpoint ``name`` with only its first ``blocks`` blocks (the same shapes otherwise)."""
    return make(name, blocks)


def row(label: str, mode: str, size: int, run: dict, plain: float, guess: int) -> list[str]:
    stages = ", ".join(f"{k} {v:.0f}" for k, v in run["stages"].items())
    return [label, mode, f"{size / GIB:.2f}", f"{run['peak'] / GIB:.2f}", f"{(run['peak'] - size) / GIB:+.2f}",
            f"{guess / GIB:.2f}", f"{run['seconds'] / 60:.1f}", f"{run['seconds'] / plain:.1f}×", stages]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,qwen2-1.5b,llama3-8b")
    parser.add_argument("--modes", default="memory,stream")
    parser.add_argument("--blocks", default="2,4", help="the Llama shapes: run checkpoints of these many blocks")
    parser.add_argument("--estimate-only", default="", help="models given only the memory estimate, no run")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rows, notes = [], []
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        for name in args.models.split(","):
            models = {"smollm2": [("SmolLM2-135M (real)", SMOLLM2)]}.get(name)
            total = BLOCKS.get(name)
            shape = {"llama3-8b": "Llama-3-8B", "llama3-70b": "Llama-3-70B"}.get(name, name)
            if models is None and total and args.blocks:
                models = [(f"{shape} shape, {b} of {total} blocks", truncated(name, int(b)))
                          for b in args.blocks.split(",")]
            elif models is None:
                models = [(f"{name} shape (random bf16)", make(name))]
            if name in args.estimate_only.split(","):
                rows.extend(estimate_rows(f"{shape} shape", models[-1][1], args.modes.split(","), total))
                continue
            measured = {}  # mode → [(blocks, checkpoint bytes, run, plain seconds)] of the few-block runs
            for label, model in models:
                plain, plain_peak = plain_pass(model)
                notes.append(f"{label}: plain forward+backward over the 32×256 tokens {plain:.1f} s, peak "
                             f"{plain_peak / GIB:.2f} GiB")
                for mode in args.modes.split(","):
                    out = work / f"{model.name}-{mode}"
                    run = compress_run(model, out, mode == "stream")
                    rows.append(row(label, mode, checkpoint_bytes(model), run, plain, estimate(model, mode == "stream")))
                    if total and args.blocks:
                        blocks = int(label.split(", ")[1].split()[0])
                        measured.setdefault(mode, []).append((blocks, checkpoint_bytes(model), run, plain))
                    if name == "smollm2":
                        notes.append(f"{label}, {mode}: alice29 perplexity {perplexity(model, out):.2f}")
                    print(" | ".join(rows[-1]), flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            for mode, runs in measured.items():
                if len(runs) >= 2:
                    rows.append(extrapolated(f"**{shape} shape, {total} blocks (extrapolated from {runs[0][0]} and "
                                             f"{runs[1][0]})**", mode, runs[:2], total, models[-1][1]))
                    print(" | ".join(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ["model", "path", "checkpoint GiB", "peak RSS GiB", "peak − checkpoint", "estimate GiB", "minutes",
              "× plain fwd+bwd", "time split, s"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    text = ["# Calibrated compression at scale", "", f"`python scripts/bench_scale.py {' '.join(sys.argv[1:])}`",
            "", "Default command: `lora-compress compress MODEL --budget 0.8 --calib asyoulik.txt` (32×256 tokens), "
            "in memory and `--stream`. Random-weight checkpoints: shapes only, no quality.", "", *table, "",
            *[f"- {note}" for note in notes], ""]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
