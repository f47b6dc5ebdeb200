#!/usr/bin/env bash
# The main job on the default real model: set up, prepare SmolLM2-135M, cut 20% of its linear
# parameters with activation-aware compression calibrated on As You Like It, evaluate on Alice
# and on two local lm-eval tasks (200 documents each).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/prepare_examples.py
python scripts/prepare_eval_tasks.py
MODEL=.cache/models/SmolLM2-135M-Instruct
OUT=${OUT:-out/smollm2-135m-budget80}
lora-compress compress "$MODEL" --budget 0.8 --calib .cache/text/asyoulik.txt --out "$OUT" --force
lora-compress evaluate "$MODEL" "$OUT" --text .cache/text/alice29.txt --json "$OUT.json" \
  --tasks movie_sentiment,prose_last_word --limit 200 --include-path .cache/eval_tasks
