"""The one-GPU check: a tiny model compressed on the CPU and on CUDA agree, and SmolLM2's demo runs on CUDA.

    python scripts/gpu_check.py [--out benchmarks/gpu.md]

1. A tiny random Llama, calibrated (--budget 0.8, the default method) with --device cpu and with
   --device cuda: the factors agree within float32/TF32 rounding (relative Frobenius error per tensor).
2. SmolLM2-135M, the demo command with --device cuda: wall time, and alice29 perplexity against the
   CPU run's (they should agree to a few percent: the kernels differ, the method does not).
Exits 1 without CUDA. Meant for a lent GPU machine; everything else in the project runs on a CPU.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_examples import SMOLLM2, TEXT, prepare_smollm2, prepare_text  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("lora-compress"))


def tiny_llama(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = (TEXT / "alice29.txt").read_text().split()[:20000]
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(words))[:510])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def compress(model: Path, out: Path, device: str, *extra: str) -> float:
    start = time.perf_counter()
    subprocess.run([CLI, "compress", str(model), "--budget", "0.8", "--calib", str(TEXT / "asyoulik.txt"), "--out",
                    str(out), "--device", device, "--force", "--quiet", *extra], check=True)
    return time.perf_counter() - start


def perplexity(model: Path, folder: Path) -> float:
    output = subprocess.run([CLI, "evaluate", str(model), str(folder), "--text", str(TEXT / "alice29.txt"),
                             "--quiet", "--no-report"], capture_output=True, text=True, check=True).stdout
    return float(next(line for line in output.splitlines() if line.startswith("perplexity")).split()[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device here: run this on a GPU machine")
    prepare_text()
    prepare_smollm2()
    lines = ["# One-GPU check", "", f"`python scripts/gpu_check.py`, {torch.cuda.get_device_name(0)}, torch "
             f"{torch.__version__}", ""]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = tiny_llama(work / "tiny")
        for device in ("cpu", "cuda"):
            compress(model, work / device, device, "--calib-samples", "8", "--calib-len", "64")
        cpu, gpu = (load_file(str(work / d / "model.safetensors")) for d in ("cpu", "cuda"))
        errors = {k: float((gpu[k].float() - cpu[k].float()).norm() / cpu[k].float().norm().clamp_min(1e-12))
                  for k in cpu if k.endswith(("lora_A", "lora_B"))}
        lines += [f"- tiny Llama, factors CPU vs CUDA: {len(errors)} tensors, largest relative error "
                  f"{max(errors.values()):.2e} (product B·A compared in the next line)"]
        products = [float(((gpu[f"{n}.lora_B"] @ gpu[f"{n}.lora_A"]) - (cpu[f"{n}.lora_B"] @ cpu[f"{n}.lora_A"])).norm()
                          / (cpu[f"{n}.lora_B"] @ cpu[f"{n}.lora_A"]).norm())
                    for n in {k.rsplit(".", 1)[0] for k in errors}]
        lines += [f"- tiny Llama, B·A CPU vs CUDA: largest relative error {max(products):.2e}"]
        timings = {device: compress(SMOLLM2, work / f"smol-{device}", device) for device in ("cuda", "cpu")}
        for device, seconds in timings.items():
            lines += [f"- SmolLM2 demo command on {device}: {seconds:.0f} s, alice29 perplexity "
                      f"{perplexity(SMOLLM2, work / f'smol-{device}'):.2f}"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
