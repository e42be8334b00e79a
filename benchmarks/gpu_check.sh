#!/usr/bin/env bash
# One prepared GPU check: real-size DeiT-Small, random weights. Needs the venv (make venv) and a CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
"$PY" benchmarks/gpu_check.py --device cuda "$@"
