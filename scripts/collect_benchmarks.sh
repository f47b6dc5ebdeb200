#!/usr/bin/env bash
# Assemble BENCHMARKS.md from the tables the bench_*.py scripts wrote into benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Benchmarks"
  echo
  echo "Every table below was written by the script named at its top, on this project's 2-core CPU machine."
  echo "Figures are measured, not typed; seconds are wall time on a shared machine (see each section)."
  for f in domains quality lm-eval scale extract heal speed speed-memory speed-7b experts; do
    [ -f "benchmarks/$f.md" ] || continue
    echo
    sed 's/^#/##/' "benchmarks/$f.md"
  done
} > BENCHMARKS.md
