"""Extract a fine-tune as a PEFT LoRA adapter, then load it with peft alone.

``lc.extract`` factors each changed layer's delta (tuned − base) to a rank (16 here) and writes a PEFT
adapter folder (adapter_config.json, adapter_model.safetensors). peft's ``PeftModel`` then puts it onto
the base model. Prints the adapter's size, and on a sentence the logits' relative error against the
fine-tune: of the base model alone (what the fine-tune changed) and of base + adapter (what is left).

    python examples/04_extract_peft.py [--base FOLDER] [--tuned FOLDER] [--rank R] [--out FOLDER]
"""
import argparse
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import lora_compress as lc

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base", default=".cache/models/SmolLM2-135M-Instruct")
parser.add_argument("--tuned", default=".cache/models/SmolLM2-135M-movies", help="a fine-tune of --base")
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--out", default="out/examples/movies-adapter")
parser.add_argument("--sentence", default="A gorgeous, moving film, and the best thing I have seen this year.")
args = parser.parse_args()
prepared_by = {args.base: "python scripts/prepare_examples.py", args.tuned: "python scripts/make_finetune.py"}
for path, command in prepared_by.items():
    if not Path(path).exists():
        print(f"{path} is missing; prepare it with: {command}")
        sys.exit(2)

report = lc.extract(args.base, args.tuned, args.out, lc.ExtractConfig(rank=args.rank), force=True, progress=False)
print(f"wrote {args.out}: {len(report.layers)} layers at rank {args.rank}, {report.params:,} adapter weights "
      f"({report.params / report.dense_params:.1%} of the changed layers)")

tokenizer = AutoTokenizer.from_pretrained(args.base)
inputs = tokenizer(args.sentence, return_tensors="pt")
with torch.no_grad():
    tuned = AutoModelForCausalLM.from_pretrained(args.tuned)(**inputs).logits
    base_model = AutoModelForCausalLM.from_pretrained(args.base)
    base = base_model(**inputs).logits
    adapted = PeftModel.from_pretrained(base_model, args.out)(**inputs).logits  # peft alone reads the folder


def error(logits):
    return float(torch.linalg.norm(logits - tuned) / torch.linalg.norm(tuned))


print(f"logits' relative error against the fine-tune: base {error(base):.4f}, base + adapter {error(adapted):.4f}")
