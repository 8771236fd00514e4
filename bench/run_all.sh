#!/usr/bin/env bash
# The CPU benchmark suite (items 1-3 of bench/README.md, and item 6's Flower-engine timings); target: under 15 minutes on the 2-core machine
# when it is idle. Results go to bench/results/<date>/ (JSON + the console log).
#   bench/run_all.sh            # full
#   bench/run_all.sh --quick    # smoke test (tiny settings; timings meaningless)
# PYTHON defaults to .venv/bin/python; run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
QUICK="${1:-}"
OUT="bench/results/$(date +%Y-%m-%d_%H-%M-%S)${QUICK:+_quick}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
{
  echo "# fedlora CPU benchmark suite $(date -Is) ${QUICK}"
  echo "# $(uname -srm); $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg); git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "## 3. aggregation"
  "$PY" bench/aggregation.py $QUICK --json "$OUT/aggregation.json"
  echo "## 2. memory"
  "$PY" bench/memory.py $QUICK --json "$OUT/memory.json" --keep "$OUT/memory_runs"
  echo "## 6. clients: Flower's simulation engine alone (the federations of item 6: bench/clients.py)"
  if [ -n "$QUICK" ]; then
    "$PY" bench/clients.py --engine-only --clients 10,100 --json "$OUT/clients_engine.json"
  else
    "$PY" bench/clients.py --engine-only --clients 10,1000,10000 --json "$OUT/clients_engine.json"
  fi
  echo "## 1. overhead"
  "$PY" bench/overhead.py $QUICK --json "$OUT/overhead.json" --keep "$OUT/overhead_runs"
  echo "# suite done in $(( $(date +%s) - start )) s"
} 2>&1 | tee "$OUT/console.log"
