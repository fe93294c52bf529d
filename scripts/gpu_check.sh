#!/usr/bin/env bash
# GPU check (never part of CI): real launches of the recipes on a CUDA machine, one RESULT line each, < 8 minutes.
#   bf16 full SiD on a 55.8M-parameter UNet, 1 process (images/s, peak torch.cuda.max_memory_allocated);
#   the same under DeepSpeed ZeRO-2 with all visible GPUs -- full SiD was refused under DeepSpeed when this was
#     written ("DeepSpeed trains one model per Accelerator"); the check then says status=refused and runs the
#     reflow recipe's one-model distill stage under ZeRO-2 instead (check=reflow_zero2);
#   the same under FSDP (accelerate_configs/fsdp.yaml) with all visible GPUs; LoRA-GA runs (recipes/lora.py) in fp32 and bf16.
# The work is done by benchmarks/gpu_check.py (its docstring lists the figures and where they are read from).
#
#   scripts/gpu_check.sh                          # CUDA machine; exits 2 without CUDA
#   scripts/gpu_check.sh --dry-run                # print the launches only
#   GPU_CHECK_ALLOW_CPU=1 scripts/gpu_check.sh    # the same launches on CPU, tiny settings (plumbing check)
#   scripts/gpu_check.sh --checks sid_1proc lora_ga --out /tmp/gpu_check
# PYTHON (default: python) is the interpreter with the toolkit installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [[ "${GPU_CHECK_ALLOW_CPU:-0}" != "1" && " $* " != *" --dry-run "* ]]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: CUDA is not available to $PY (torch.cuda.is_available() is False). Run this on a CUDA" \
             "machine; GPU_CHECK_ALLOW_CPU=1 runs the same launches on CPU (tiny, plumbing only);" \
             "--dry-run prints them." >&2
        exit 2
    fi
fi
# the whole check stays under 8 minutes on a GPU (each launch also has its own limit); CPU runs take longer
LIMIT="${GPU_CHECK_TIMEOUT:-$([[ "${GPU_CHECK_ALLOW_CPU:-0}" == "1" ]] && echo 1800 || echo 480)}"
timeout "$LIMIT" "$PY" benchmarks/gpu_check.py "$@"
