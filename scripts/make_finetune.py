"""Make a real fine-tune of SmolLM2-135M offline, for `lora-compress extract` tests and benchmarks.

Trains on the movie-review snippets of ``vader_movie_reviews.tsv`` (a domain the instruct model
was not tuned on) for a few CPU minutes, then saves into ``.cache/models/``:

- ``SmolLM2-135M-movies-lokr/``: the PEFT LoKr adapter (Kronecker factors: a high-rank delta that
  PEFT's own ``convert_to_lora`` can also turn into a LoRA, for the benchmark)
- ``SmolLM2-135M-movies/``: the fine-tune merged into a plain checkpoint (the ``--tuned`` model)
- ``SmolLM2-135M-movies-full/`` with ``--method full``: plain full fine-tuning of every weight
  instead (what mergekit-extract-lora users start from)

Usage: ``python scripts/make_finetune.py [--method lokr|full] [--steps 12]`` (after prepare_examples.py)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_examples import MODELS, SMOLLM2, VADER_MOVIES  # noqa: E402

FINETUNE = MODELS / "SmolLM2-135M-movies"
LOKR_ADAPTER = MODELS / "SmolLM2-135M-movies-lokr"
FULL_FINETUNE = MODELS / "SmolLM2-135M-movies-full"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def movie_batches(tokenizer, steps: int, batch: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps`` batches of ``batch`` random ``length``-token windows of the movie-review snippets."""
    lines = VADER_MOVIES.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line.split("\t", 2)[2] for line in lines if line.count("\t") >= 2)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]  # (N,)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (steps, batch), generator=generator)
    return [torch.stack([ids[s: s + length] for s in row.tolist()]) for row in starts]  # each (batch, length)


def train(model, batches: list[torch.Tensor], lr: float) -> tuple[float, float]:
    """AdamW on the next-token loss; returns the first and the mean of the last 5 losses."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    losses, start = [], time.perf_counter()
    for step, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step + 1}/{len(batches)} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return losses[0], sum(losses[-5:]) / len(losses[-5:])


def save_plain(model, tokenizer, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("lokr", "full"), default="lokr")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=96)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, dtype=torch.float32)
    batches = movie_batches(tokenizer, args.steps, args.batch, args.length)
    start = time.perf_counter()
    if args.method == "lokr":
        from peft import LoKrConfig, get_peft_model

        model = get_peft_model(model, LoKrConfig(r=8, alpha=8, target_modules=TARGETS))
        first, last = train(model, batches, lr=2e-3)
        shutil.rmtree(LOKR_ADAPTER, ignore_errors=True)
        model.save_pretrained(LOKR_ADAPTER)
        save_plain(model.merge_and_unload(), tokenizer, FINETUNE)
        where = f"{FINETUNE} (adapter: {LOKR_ADAPTER})"
    else:
        first, last = train(model, batches, lr=2e-5)
        save_plain(model, tokenizer, FULL_FINETUNE)
        where = str(FULL_FINETUNE)
    print(f"{args.method}: loss {first:.3f} → {last:.3f} in {time.perf_counter() - start:.0f} s; wrote {where}")


if __name__ == "__main__":
    main()
