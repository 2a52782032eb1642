#!/usr/bin/env bash
# Quickstart: set up, then train AdaLoRA on SST-2 with the embedded MiniLM-L6 (offline, 300 steps, budget 0.3M)
# and evaluate the saved run. Results land in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
adalora train --config configs/quickstart.yaml --overwrite "$@"
adalora eval runs/quickstart
