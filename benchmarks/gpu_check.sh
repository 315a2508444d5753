#!/usr/bin/env bash
# On a machine with a CUDA device: one short epoch of every method on A/V-shaped data in bf16, the
# step-cost benchmark (ResNet-18, bf16), the GPU options (channels_last, torch.compile: joint and
# ARL, interleaved, compilation timed apart), peak memory per method, the Shapley-cost and loader
# benchmarks; CSVs in benchmarks/results/ (commit them with the device name, which each CSV records).
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("no CUDA device: nothing to check")
print("device:", torch.cuda.get_device_name(0))
PY
$PY benchmarks/epoch_check.py --device cuda --precision bf16
$PY benchmarks/step_cost.py --model resnet --device cuda --precision bf16 --rounds 5 --steps 10
$PY benchmarks/step_cost.py --model resnet --device cuda --precision bf16 --methods joint,arl \
    --variants default,channels_last,compile,channels_last+compile --rounds 5 --steps 10 --no-epochs
$PY benchmarks/memory.py --model resnet --device cuda --batch 32
$PY benchmarks/shapley_cost.py --device cuda
$PY benchmarks/loader.py --device cuda --workers 0,2,4,8 --actors 40 --batch 64 --width 64
