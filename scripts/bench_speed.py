"""Scale and speed: SVD stage vs PEFT, peak memory streaming vs in-memory, 7B-shaped blocks, forward latency.

    python scripts/bench_speed.py [--parts svd,crossover,rss,7b,latency] [--blocks 2] [--out FILE]

Writes benchmarks/speed.md. Every figure is measured in this run; ratios are within one run
(the machine is shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from prepare_examples import SMOLLM2, TEXT  # noqa: E402

from lora_compress import CompressConfig, compress_  # noqa: E402
from lora_compress.core import svd as svdmath  # noqa: E402
from lora_compress.storage.checkpoint import load_dense, resolve_source  # noqa: E402
from lora_compress.report.tables import render  # noqa: E402
from lora_compress.core.workers import ordered_map  # noqa: E402

OUT = REPO / "benchmarks" / "speed.md"
SCRATCH = REPO / ".cache" / "bench_speed" / str(os.getpid())  # own folder: parts may run side by side
RANK = 128
STAGE_ROUNDS = 3
STAGE_WORKERS = torch.get_num_threads()
CALIB = TEXT / "asyoulik.txt"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _weights():
    with safe_open(SMOLLM2 / "model.safetensors", "pt") as handle:
        return {k: handle.get_tensor(k).float() for k in handle.keys() if k.endswith("proj.weight")}


def _rel_error(W, approx):
    return float(torch.linalg.norm(W - approx) / torch.linalg.norm(W))


def _peft_layers():
    """SmolLM2 wrapped by PEFT with untouched LoRA layers, to call PEFT's own pissa_init per layer."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_dense(resolve_source(str(SMOLLM2))),
                           LoraConfig(r=RANK, lora_alpha=RANK, target_modules=PROJ, init_lora_weights=False))
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "pissa_init")}


def _timed(fn):
    """Seconds ``fn`` takes, and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _ours(W, svd):
    """Time our factorisation alone; the error is measured after the clock stops."""
    took, f = _timed(lambda: svdmath.factorize(W, RANK, solver=svd))
    return took, _rel_error(W, f.B @ f.A)


def _peft(layer, W, init):
    """Time PEFT's pissa_init (its SVD and the residual W − B·A it stores) alone."""
    layer.get_base_layer().weight.data = W.clone()
    took, _ = _timed(lambda: layer.pissa_init("default", init))
    return took, float(torch.linalg.norm(layer.get_base_layer().weight) / torch.linalg.norm(W))


def svd_stage() -> str:
    weights, layers = _weights(), _peft_layers()
    solvers = {"torch.linalg.svd (full)": lambda name, W: _ours(W, "full"),
               "lora-compress --solver auto": lambda name, W: _ours(W, "auto"),
               "lora-compress --solver randomized": lambda name, W: _ours(W, "randomized"),
               "PEFT PiSSA (full SVD)": lambda name, W: _peft(layers[name], W, "pissa"),
               "PEFT PiSSA pissa_niter_4": lambda name, W: _peft(layers[name], W, "pissa_niter_4")}
    seconds, errors = {s: 0.0 for s in solvers}, {s: [] for s in solvers}
    by_shape = {}  # (out, in) → {solver: seconds}
    for key, W in weights.items():  # solvers interleaved layer by layer, so load changes hit all alike
        for solver, fn in solvers.items():
            took, error = fn(key.removesuffix(".weight"), W)
            seconds[solver] += took
            errors[solver].append(error)
            shape = by_shape.setdefault(tuple(W.shape), {})
            shape[solver] = shape.get(solver, 0.0) + took
    full_err, peft_time = errors["torch.linalg.svd (full)"], seconds["PEFT PiSSA (full SVD)"]
    rows = []
    for solver in solvers:
        ratios = [e / f for e, f in zip(errors[solver], full_err)]
        rows.append([solver, f"{seconds[solver]:.2f}", f"{peft_time / seconds[solver]:.2f}×",
                     f"{sum(errors[solver]) / len(ratios):.4f}", f"{(sum(ratios) / len(ratios) - 1) * 100:+.2f}%",
                     f"{(max(ratios) - 1) * 100:+.2f}%"])
    picks = sorted({f"{svdmath.choose_svd(tuple(W.shape), RANK)} for {W.shape[0]}×{W.shape[1]}"
                    for W in weights.values()})
    return (f"### SVD stage: all {len(weights)} linear layers of SmolLM2-135M at rank {RANK} "
            f"(torch threads: {torch.get_num_threads()}; solvers interleaved layer by layer; seconds count "
            "the factorisation only, not the error measurement)\n\n"
            + render(rows, ["solver", "seconds", "speed vs PEFT full", "mean rel. error ‖W−BA‖/‖W‖",
                            "mean error vs full", "worst layer vs full"])
            + f"\n\nauto chose: {'; '.join(picks)} (randomized while rank {RANK} + oversample "
              f"{svdmath.OVERSAMPLE} is below {svdmath.AUTO_FRACTION} of the smaller side, else Gram/eigh).\n\n"
            + "By shape (same loop):\n\n" + _by_shape_table(by_shape, weights) + "\n\n"
            + stage_rounds(weights, layers, STAGE_ROUNDS))


def _stage_seconds(weights: dict, layers: dict, solver: str) -> float:
    """Wall seconds of one whole SVD stage, layers back to back as ``compress`` runs them."""
    pairs = [(layers[key.removesuffix(".weight")], W) for key, W in weights.items()]
    if solver.startswith("PEFT"):
        for layer, W in pairs:
            layer.get_base_layer().weight.data = W.clone()
        return _timed(lambda: [layer.pissa_init("default", "pissa") for layer, _ in pairs])[0]
    svd = "full" if solver.startswith("torch") else "auto"  # full: what the interleaved loop's first row times
    workers = STAGE_WORKERS if "workers" in solver else 1
    return _timed(lambda: list(ordered_map(lambda W: svdmath.factorize(W, RANK, solver=svd), weights.values(),
                                           workers)))[0]


def stage_rounds(weights: dict, layers: dict, rounds: int) -> str:
    """The whole stage per solver, ``rounds`` times with the solver order rotated; median round."""
    solvers = ["PEFT PiSSA (full SVD)", "lora-compress --solver auto", f"lora-compress --solver auto, {STAGE_WORKERS} workers",
               f"torch.linalg.svd (full), {STAGE_WORKERS} workers"]
    seconds = {solver: [] for solver in solvers}
    for turn in range(rounds):
        for solver in solvers[turn % len(solvers):] + solvers[:turn % len(solvers)]:
            seconds[solver].append(_stage_seconds(weights, layers, solver))
    median = {solver: statistics.median(times) for solver, times in seconds.items()}
    peft = median["PEFT PiSSA (full SVD)"]
    rows = [[solver, f"{median[solver]:.2f}", " ".join(f"{t:.2f}" for t in seconds[solver]),
             f"{peft / median[solver]:.2f}×"] for solver in solvers]
    return (f"#### The whole stage as compress runs it: all {len(weights)} layers back to back, {rounds} rounds "
            f"(solver order rotated), median round; {STAGE_WORKERS} workers = {STAGE_WORKERS} layers at once, "
            f"each on 1 of the {torch.get_num_threads()} torch threads (workers.py)\n\n"
            + render(rows, ["solver", "median s", "rounds s", "speed vs PEFT full"]) + "\n")


def _by_shape_table(by_shape: dict, weights: dict) -> str:
    """Seconds of PEFT's full-SVD path and of ``--solver auto`` per layer shape: where the speed-up is won."""
    counts, rows = Counter(tuple(W.shape) for W in weights.values()), []
    for shape, took in by_shape.items():
        peft, auto = took["PEFT PiSSA (full SVD)"], took["lora-compress --solver auto"]
        rows.append([f"{shape[0]}×{shape[1]}", counts[shape], f"{peft:.2f}", f"{auto:.2f}",
                     f"{svdmath.choose_svd(shape, RANK)}", f"{peft / auto:.2f}×"])
    return render(rows, ["shape", "layers", "PEFT full s", "auto s", "auto picks", "speed-up"])


def crossover() -> str:
    """Full, Gram/eigh and randomized on SmolLM2 shapes as rank + oversample nears min(out, in): where
    ``auto`` switches."""
    rows = []
    with safe_open(SMOLLM2 / "model.safetensors", "pt") as handle:
        for kind in ("self_attn.k_proj", "self_attn.q_proj", "mlp.up_proj"):
            W = handle.get_tensor(f"model.layers.5.{kind}.weight").float()
            for fraction in (0.15, 0.3, 0.45, 0.6, 0.75, 0.9):
                rank = max(1, int(fraction * min(W.shape)) - svdmath.OVERSAMPLE)
                best = {m: min(_timed(lambda: svdmath.truncated_svd(W, rank, m))[0] for _ in range(5))
                        for m in ("full", "gram", "randomized")}
                rows.append([kind, "×".join(map(str, W.shape)), rank, f"{fraction:.2f}",
                             *(f"{best['full'] / best[m]:.2f}×" for m in ("gram", "randomized")),
                             svdmath.choose_svd(tuple(W.shape), rank)])
    return ("### Where auto switches: speed-up over the full SVD (best of 5 each), by (rank + oversample) / "
            "min(out, in)\n\n"
            + render(rows, ["layer", "shape", "rank", "(r+p)/min", "Gram/eigh", "randomized", "auto picks"]) + "\n")


def _peak_rss(args: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one lora-compress run in a child process."""
    return _peak_rss_of([shutil.which("lora-compress") or str(Path(sys.executable).with_name("lora-compress")), *args])


def _peak_rss_of(command: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - start


def rss_smollm2() -> str:
    """Peak RSS of in-memory vs streamed compression: plain SVD, and calibrated (sequential + budget)."""
    calibrated = ["--budget", "0.8", "--calib", str(CALIB), "--calib-samples", "8"]
    runs = {("plain SVD --ratio 0.5", "in-memory"): ["--ratio", "0.5"],
            ("plain SVD --ratio 0.5", "--stream"): ["--ratio", "0.5", "--stream"],
            ("sequential --budget 0.8 (8×256 calibration tokens)", "in-memory"): calibrated,
            ("sequential --budget 0.8 (8×256 calibration tokens)", "--stream"): [*calibrated, "--stream"]}
    rows, peaks = [], {}
    for (method, path), extra in runs.items():
        out = SCRATCH / "smol-rss"
        shutil.rmtree(out, ignore_errors=True)
        rss, seconds = _peak_rss(["compress", str(SMOLLM2), "--out", str(out), "--quiet", *extra])
        shutil.rmtree(out)
        peaks[method, path] = rss
        ratio = "" if path == "in-memory" else f"{rss / peaks[method, 'in-memory']:.2f}×"
        rows.append([method, path, f"{rss:.2f}", ratio, f"{seconds:.0f}"])
    baseline = _peak_rss_of([sys.executable, "-c", "import lora_compress.cli, transformers, torch"])[0]
    return ("### Peak RSS compressing SmolLM2-135M (fp32 checkpoint, 538 MB)\n\n"
            + render(rows, ["method", "path", "peak RSS (GiB)", "stream / in-memory", "seconds"])
            + f"\n\nA Python process that only imports lora-compress, transformers and torch peaks at "
              f"{baseline:.2f} GiB; that floor is in every figure above.\n")


def _llama7b_checkpoint(folder: Path, blocks: int) -> int:
    """A Llama-7B-shaped checkpoint with ``blocks`` decoder blocks of random bf16 weights, sharded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=blocks,
                         num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    from safetensors.torch import save_file

    state = model.state_dict()
    generator, weight_map, shard, size = torch.Generator().manual_seed(0), {}, {}, 0
    for number, (name, param) in enumerate(state.items(), 1):
        shard[name] = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 2 * 2**30 or number == len(state):
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, folder / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, size = {}, 0
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def llama7b(blocks: int) -> str:
    folder, out = SCRATCH / f"llama7b-{blocks}", SCRATCH / f"llama7b-{blocks}-out"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    try:
        size = _llama7b_checkpoint(folder, blocks)
        rss, seconds = _peak_rss(["compress", str(folder), "--out", str(out), "--rank", "256", "--stream", "--quiet"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    per_block = seconds / blocks
    table = render([[f"{size / 1e9:.2f}", f"{rss:.2f}", f"{seconds:.0f}", f"{per_block:.0f}"]],
                   ["checkpoint GB", "peak RSS (GiB)", "seconds", "seconds per block (incl. start-up)"])
    heading = (f"### Llama-7B shapes (hidden 4096, MLP 11008, vocab 32000, bf16 random weights), {blocks} of 32 "
               f"decoder blocks, plain SVD --rank 256 --stream\n\n")
    if blocks >= 32:
        return heading + table + "\n\nThe whole model, read and written one tensor at a time.\n"
    return (heading + table
            + f"\n\nExtrapolation to the full 32-block model (13.5 GB), stated as such: streaming holds one "
              f"tensor at a time, so peak RSS does not grow with the number of blocks; wall time ≈ 32 × "
              f"{per_block:.0f} s ≈ {32 * per_block / 60:.0f} min here.\n")


def _median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def latency() -> str:
    rows = []
    shapes = {"1×1": (1, 1, 15), "8×256": (8, 256, 3)}
    models = {"dense": load_dense(resolve_source(str(SMOLLM2)))}
    for cut in (0.2, 0.4):
        model = load_dense(resolve_source(str(SMOLLM2)))
        compress_(model, CompressConfig(ratio=1 - cut), progress=False)
        models[f"{cut:.0%} cut"] = model
    timings = {name: {} for name in models}
    for label, (batch, length, repeats) in shapes.items():
        ids = torch.randint(0, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
        for name, model in models.items():  # interleaved so load changes hit all alike
            timings[name][label] = _median_seconds(lambda: model(ids), repeats)
    for name in models:
        rows.append([name] + [f"{timings[name][s] * 1000:.1f} ({timings['dense'][s] / timings[name][s]:.2f}×)"
                              for s in shapes])
    return ("### Forward latency, SmolLM2-135M fp32 (ms, median; speed-up vs dense)\n\n"
            + render(rows, ["model", "batch 1×1 token", "batch 8×256 tokens"]) + "\n" + layer_latency())


@torch.no_grad()
def layer_latency() -> str:
    """One 576→1536 layer: dense vs factored at several ranks, to state the factoring rule."""
    from torch.nn import functional as F

    m, n, rows = 1536, 576, []
    W = torch.randn(m, n)
    for tokens in (1, 2048):
        x = torch.randn(tokens, n)
        dense = _median_seconds(lambda: F.linear(x, W), 30)
        for keep in (0.25, 0.5, 0.75, 0.9, 0.95):
            r = svdmath.rank_for_ratio(m, n, keep)
            A, B = torch.randn(r, n), torch.randn(m, r)
            factored = _median_seconds(lambda: F.linear(F.linear(x, A), B), 30)
            rows.append([tokens, f"{keep:.2f}", r, f"{dense * 1e6:.0f}", f"{factored * 1e6:.0f}",
                         f"{dense / factored:.2f}×"])
    return ("\n#### One 1536×576 layer (µs, median of 30): factored vs dense by kept parameter fraction\n\n"
            + render(rows, ["tokens", "params kept", "rank", "dense µs", "factored µs", "speed-up"]) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="svd,crossover,rss,7b,latency")
    parser.add_argument("--blocks", type=int, default=2, help="Llama-7B-shaped decoder blocks to write")
    parser.add_argument("--out", default=str(OUT.relative_to(REPO)), help="markdown file to write")
    args = parser.parse_args()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    parts = {"svd": svd_stage, "crossover": crossover, "rss": rss_smollm2, "7b": lambda: llama7b(args.blocks), "latency": latency}
    sections, load = [], " ".join(f"{x:.1f}" for x in os.getloadavg())
    try:
        for name in args.parts.split(","):
            print(f"running {name} …", flush=True)
            sections.append(parts[name]())
            print(sections[-1], flush=True)
    finally:
        shutil.rmtree(SCRATCH, ignore_errors=True)
    out = REPO / args.out
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"# Scale and speed\n\n`python scripts/bench_speed.py {' '.join(sys.argv[1:])}` "
                   f"({os.cpu_count()} CPU cores, load average {load} at the start, torch {torch.__version__})\n\n"
                   + "\n".join(sections))


if __name__ == "__main__":
    main()
