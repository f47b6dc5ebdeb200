"""Load a compressed folder with transformers alone, and generate.

No lora-compress import: the folder carries its own modeling file (``modeling_lora_compressed.py``),
which ``trust_remote_code=True`` lets transformers run; each factored layer is built as the low-rank
pair, so the parameter savings hold in memory too. Prints the parameter count and the greedy
continuation of a prompt. The folder comes from examples/02 (or ``lora-compress compress``).

    python examples/03_load_with_transformers.py [--folder FOLDER] [--prompt TEXT]
"""
import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--folder", default="out/examples/smollm2-80", help="a compressed causal LM folder")
parser.add_argument("--prompt", default="Alice was beginning to get very tired of")
parser.add_argument("--tokens", type=int, default=24, help="new tokens to generate")
args = parser.parse_args()
if not (Path(args.folder) / "lora_compress.json").exists():
    print(f"{args.folder} is not a compressed folder yet; write it with: python examples/02_compress_and_evaluate.py")
    sys.exit(2)

model = AutoModelForCausalLM.from_pretrained(args.folder, trust_remote_code=True)  # runs the folder's modeling file
tokenizer = AutoTokenizer.from_pretrained(args.folder)  # the base model's tokenizer, copied into the folder
print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")

inputs = tokenizer(args.prompt, return_tensors="pt")
with torch.no_grad():
    output = model.generate(**inputs, max_new_tokens=args.tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
print(repr(tokenizer.decode(output[0], skip_special_tokens=True)))
