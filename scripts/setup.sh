#!/usr/bin/env bash
# One-time set-up: a virtual environment with the CPU torch wheel and the project (editable) + test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Install torch first: on machines with a local CPU wheel this avoids a multi-GB CUDA download.
.venv/bin/python -m pip show torch >/dev/null 2>&1 || .venv/bin/python -m pip install -q "torch==2.13.0" \
  || .venv/bin/python -m pip install -q "torch>=2.4"
.venv/bin/python -m pip install -q -e ".[test]"
# torchvision from PyPI breaks transformers' GPT-2 import beside the CPU torch wheel; we never need it.
.venv/bin/python -m pip uninstall -y -q torchvision >/dev/null 2>&1 || true
echo "set-up done: .venv ready"
