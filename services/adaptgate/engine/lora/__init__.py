"""Many LoRA adapters in one forward pass (the S-LoRA / Punica idea, vLLM's batch-wide mapping).

`layers`: the wrapped linears and their owner, `LoraLayers`. `mapping`: a forward's rows, slots and
packed layout, built once per batch. `backend`: the seam, one backend per engine, which owns the
weight layout, the per-forward preparation of the mapping and the per-layer op. Backends:
`reference` (gathered bmm, padded and packed; the tests' reference), `cpu_kernel` (engine.cpu_kernels'
fused AVX512-BF16 and AVX2 calls), `triton_gemm` (base and deltas in one Triton GEMM; imports Triton, so only
on request). `merged`: the one hot adapter merged into copies of the base weights, for batches of it alone.
"""

from adaptgate.engine.lora.backend import LoraBackend
from adaptgate.engine.lora.layers import BatchedLoraLinear, LoraLayers, linear_in_out, select_backend
from adaptgate.engine.lora.mapping import LoraMapping
from adaptgate.engine.lora.reference import CHUNK_LENGTHS, GatheredBmm, LoraChunks, chunk_length

__all__ = [
    "CHUNK_LENGTHS",
    "BatchedLoraLinear",
    "GatheredBmm",
    "LoraBackend",
    "LoraChunks",
    "LoraLayers",
    "LoraMapping",
    "chunk_length",
    "linear_in_out",
    "select_backend",
]
