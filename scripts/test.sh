#!/usr/bin/env bash
# Set up, prepare the real example models, texts, lm-eval tasks and a fine-tune, then run the fast tests and the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/prepare_examples.py
python scripts/prepare_eval_tasks.py   # local lm-eval tasks over the prepared text (.cache/eval_tasks)
[ -d .cache/models/SmolLM2-135M-movies ] || python scripts/make_finetune.py   # a real fine-tune for extract
python -m pytest -q -m "not real" "$@"
python -m pytest -q -m real "$@"
