#!/usr/bin/env bash
# Create .venv (once) and install the project into it: torch first, pinned to the CPU build this machine
# ships (an unpinned torch would pull a multi-GB CUDA build), then the toolkit with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.onestep-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[dev,bitsandbytes]"
  # DeepSpeed's setup.py imports torch: without --no-build-isolation pip would build it against a fresh,
  # unpinned (multi-GB CUDA) torch. Installed so the ZeRO-3 test runs on 2 CPU processes here and in CI.
  .venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.15"
  touch "$stamp"
fi
