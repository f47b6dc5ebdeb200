#!/usr/bin/env bash
# The main job on the default real model, in a few minutes: set up, prepare SmolLM2-135M, cut 20% of its
# linear parameters with activation-aware compression calibrated on As You Like It, then evaluate both
# models on the first 2,048 tokens of Alice and on two local lm-eval tasks (100 documents each: 300
# requests per model), and print the before/after table. Every step longer than a few seconds shows a
# progress bar.
#
#   bash scripts/demo.sh               set up, prepare, compress, evaluate
#   bash scripts/demo.sh --no-setup    compress and evaluate only (after a first run; how it is timed)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--no-setup" ]; then
  bash scripts/setup.sh
  . .venv/bin/activate
  python scripts/prepare_examples.py
  python scripts/prepare_eval_tasks.py
else
  [ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
fi
MODEL=.cache/models/SmolLM2-135M-Instruct
OUT=${OUT:-out/smollm2-135m-budget80}
LIMIT=${LIMIT:-100}
lora-compress compress "$MODEL" --budget 0.8 --calib .cache/text/asyoulik.txt --out "$OUT" --force
lora-compress evaluate "$MODEL" "$OUT" --text .cache/text/alice29.txt --max-tokens 2048 --json "$OUT.json" \
  --tasks movie_sentiment,prose_last_word --limit "$LIMIT" --include-path .cache/eval_tasks
