#!/usr/bin/env bash
# One prepared GPU check (about 7 minutes on one H200; the two DeiTs took 3.5): DeiT-Small, DeiT-Base and CLIP
# ViT-B/16, random weights.
# Needs a CUDA device and the project's dependencies (the venv, or a python with torch, timm and transformers:
# PY=python3).
# Extra arguments go to gpu_check.py, e.g. --out benchmarks/results/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
PYTHONPATH=src "$PY" benchmarks/gpu_check.py --device cuda "$@"
