#!/usr/bin/env bash
# Create .venv (once) and install the project into it: torch first, pinned to the CPU build this machine
# ships (an unpinned torch would pull a multi-GB CUDA build), then the toolkit with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian data packages, installed when missing and this machine can (root + apt-get). Never fatal: without them
# the tests that need them skip and the loaders say how to get them. dataset-fashion-mnist: the text-to-image
# teacher's data; wordnet-base: the WordNet definitions of benchmarks/lora_llm.py (dataset 'wordnet').
for pkg in dataset-fashion-mnist wordnet-base; do
  if command -v dpkg >/dev/null 2>&1 && ! dpkg -s "$pkg" >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get install -y -q "$pkg" || { apt-get update -q && apt-get install -y -q "$pkg"; }; } \
      || echo "bootstrap: could not install $pkg (the tests that need it will skip)" >&2
  fi
done
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
