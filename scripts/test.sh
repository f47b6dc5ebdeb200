#!/usr/bin/env bash
# Set up, prepare the real example models and texts, then run the fast tests and the real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/prepare_examples.py
python -m pytest -q -m "not real" "$@"
python -m pytest -q -m real "$@"
