"""Random-weight bf16 checkpoints shaped like real 1-8B models, for time and memory benchmarks.

Shapes are what matter for time and memory, so the weights are random (normal, std 0.02; norms at 1):
the outputs are meaningless and no quality is measured on them. Each checkpoint is written a tensor at
a time into 2 GiB shards with an index (the layout the Hub uses), from the architecture built on the
meta device, so making an 8B checkpoint never holds more than one tensor. SmolLM2's tokenizer is
copied in (its ids are a subset of both vocabularies).

    python scripts/make_scale_checkpoints.py [--only qwen2-1.5b|llama3-8b|llama3-70b]   → .cache/models/<name>-random

Shapes: Qwen2-1.5B (hidden 1536, MLP 8960, 28 layers, vocab 151,936, 12 heads / 2 KV heads, q/k/v
biases, tied embeddings); Llama-3-8B (hidden 4096, MLP 14,336, 32 layers, vocab 128,256, 32/8 heads);
Llama-3-70B (hidden 8192, MLP 28,672, 80 layers, vocab 128,256, 64/8 heads).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_examples import MODELS, SMOLLM2, prepare_smollm2  # noqa: E402

from lora_compress.storage.shards import ShardWriter  # noqa: E402
from lora_compress.stream.lazy import parameters_on_meta  # noqa: E402


def qwen2_1_5b(layers: int = 28):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=layers, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
        dtype="bfloat16")


def llama3_8b(layers: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=5e5, tie_word_embeddings=False,
        dtype="bfloat16")


def llama3_70b(layers: int = 80):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=5e5, tie_word_embeddings=False,
        dtype="bfloat16")


SHAPES = {"qwen2-1.5b": qwen2_1_5b, "llama3-8b": llama3_8b, "llama3-70b": llama3_70b}
BLOCKS = {"llama3-8b": 32, "llama3-70b": 80}  # the shapes benchmarked as checkpoints of their first few blocks


def folder_of(name: str, layers: int | None = None) -> Path:
    return MODELS / (f"{name}-random" if layers is None else f"{name}-random-{layers}blocks")


def make(name: str, layers: int | None = None) -> Path:
    """Write the random checkpoint ``name`` (once; with ``layers``, only its first blocks) and return its folder."""
    folder = folder_of(name, layers)
    if (folder / "model.safetensors.index.json").exists() or (folder / "model.safetensors").exists():
        return folder
    cls, config = SHAPES[name]() if layers is None else SHAPES[name](layers)
    config.architectures = [cls.__name__]
    with parameters_on_meta():
        model = cls(config)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    model.tie_weights()
    writer, seen = ShardWriter(tmp, metadata={"format": "pt"}), set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or not tensor.is_floating_point() or key.endswith("inv_freq"):
            continue  # tied embeddings once, as save_pretrained writes them
        seen.add(id(tensor))
        if key.endswith("norm.weight") or "layernorm" in key:
            value = torch.ones(tensor.shape, dtype=torch.bfloat16)
        elif key.endswith(".bias"):
            value = torch.zeros(tensor.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
        writer.add(key, value)
    writer.close()
    config.save_pretrained(tmp)
    for side in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (SMOLLM2 / side).exists():
            shutil.copy(SMOLLM2 / side, tmp / side)
    (tmp / "RANDOM_WEIGHTS.md").write_text(f"Random weights shaped like {name}; for time and memory only.\n")
    tmp.rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SHAPES))
    parser.add_argument("--blocks", type=int, help="only the first N blocks (the 70B shape is made only so)")
    args = parser.parse_args()
    prepare_smollm2()
    for name in [args.only] if args.only else [name for name in SHAPES if name != "llama3-70b"]:
        folder = make(name, args.blocks)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"{folder}: {size / 2**30:.2f} GiB, {json.loads((folder / 'config.json').read_text())['model_type']}")


if __name__ == "__main__":
    main()
