#!/usr/bin/env bash
# The GPU figures issues 3 and 7 ask for, in one short run on a machine with CUDA (no Ray, no venv
# needed: torch, transformers, peft and safetensors from the system Python). Prints sequences/s and
# MFU against the GPU's own measured bf16 matmul peak, then runs the tests marked `gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=services:. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# BERT-base-sized random encoder, 64 distinct adapters r=16 on q/k/v/dense with heads, 256 x 128 tokens
python3 bench/multi_adapter.py --bert-base --seq-len 128 --batch 256 --rank 16 --texts 4096 --repeats 2
# short inputs: the same at 256 x 32
python3 bench/multi_adapter.py --bert-base --seq-len 32 --batch 256 --rank 16 --texts 4096 --repeats 2
# the packaged MiniLM on real SST-2/SMS texts
python3 bench/multi_adapter.py --batch 256 --texts 4096 --repeats 2
python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_batcher.py
