#!/usr/bin/env bash
# The GPU figures (base-model MFU, mixed-adapter throughput, the fused LoRA GEMM), in one short run on a machine with CUDA (no Ray, no venv
# needed: torch, transformers, peft and safetensors from the system Python). Prints sequences/s and
# MFU against the GPU's own measured bf16 matmul peak, then runs the tests marked `gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=services:. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# first, the fused LoRA GEMM's correctness on the GPU itself (bf16 dots; elsewhere these run in Triton's
# interpreter): its figures below mean something only if these pass, the others' do regardless
python3 -m pytest -q -p no:cacheprovider tests/unit/test_lora_triton.py || echo "FUSED TRITON GEMM TESTS FAILED"
# BERT-base-sized random encoder, 64 distinct adapters r=16 on q/k/v/dense with heads, 256 x 128 tokens;
# mixed batches on the gathered bmm and on the fused Triton GEMM (engine/lora/triton_gemm.py) at a few tile shapes
python3 bench/multi_adapter.py --bert-base --seq-len 128 --batch 256 --rank 16 --texts 4096 --repeats 2 \
  --triton-blocks 64,128,64,4,4 128,256,64,8,3 128,64,64,4,4
# short inputs: the same at 256 x 32
python3 bench/multi_adapter.py --bert-base --seq-len 32 --batch 256 --rank 16 --texts 4096 --repeats 2
# the packaged MiniLM on real SST-2/SMS texts
python3 bench/multi_adapter.py --batch 256 --texts 4096 --repeats 2
python3 -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_batcher.py
