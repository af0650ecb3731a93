#!/usr/bin/env bash
# The GPU path on a bare CUDA machine, in one go (< 8 minutes on an H100-class GPU): installs what it
# needs into .venv-gpu, runs the CUDA-marked tests, then benchmarks/gpu_check.py (bf16 index of a
# GPT-2-small-sized model over ~20k documents: tokens/s against a plain training step, peak GPU
# memory, FAISS build time, /attribute latency). Results: benchmarks/results/gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q torch   # the CUDA build from the registry
  .venv-gpu/bin/pip install -q -c constraints.txt -e ".[test]" || .venv-gpu/bin/pip install -q -e ".[test]"
  .venv-gpu/bin/pip install -q faiss-gpu-cu12 || echo "faiss-gpu not installed: FAISS builds on the CPU"
fi
.venv-gpu/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
.venv-gpu/bin/python -m pytest -q -m cuda tests/test_cuda.py
timeout 420 .venv-gpu/bin/python benchmarks/gpu_check.py "$@"
