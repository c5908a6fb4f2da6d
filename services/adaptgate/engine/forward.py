"""One padded forward pass over a batch of rows with mixed adapters, heads and poolings."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from adaptgate.engine.heads import HEAD_INPUT_CODES, HEAD_INPUT_POOLING, HeadPool
from adaptgate.engine.lora import LoraLayers
from adaptgate.engine.cpu_kernels import CpuKernels, operation_paths
from adaptgate.engine.model import BaseModel
from adaptgate.engine.packed import Packing, encoder_path
from adaptgate.engine.prepacked import prepack_linears
from adaptgate.engine.pooling import Pooling, normalize, pool, without_pad_tokens
from adaptgate.engine.rows import Row, RowResult

if TYPE_CHECKING:  # imports Triton, which only the GPU backend needs
    from adaptgate.engine.lora.triton_gemm import TritonLoraLinear


def _fused_gpu() -> TritonLoraLinear:
    from adaptgate.engine.lora.triton_gemm import TritonLoraLinear

    return TritonLoraLinear()


# Padded positions per real token above which the packed path pays for its gathers and scatters.
PACKING_MIN_WASTE = 1.25


class BatchForward:
    """Holds the base model with its LoRA layers and head pool; runs on the engine's one thread."""

    def __init__(
        self,
        base: BaseModel,
        n_slots: int,
        max_rank: int,
        max_labels: int,
        padding_free: bool = True,
        cpu_kernels: bool = True,
        gpu_lora_kernel: bool = False,
        prepack: bool = True,
        merge_hot_adapter: bool = True,
    ) -> None:
        """cpu_kernels: on CPU, the fused kernels (engine.cpu_kernels) where this CPU runs them (bf16: LoRA,
        attention and add+LayerNorm; fp32: LoRA);
        prepack: on CPU in bf16, linears on oneDNN-prepacked weights (engine.prepacked) where this CPU runs them;
        gpu_lora_kernel: on CUDA, LoRA layers run engine.lora.triton_gemm's fused GEMM (not yet measured on a
        GPU, so only bench/multi_adapter.py asks for it) instead of the gathered bmm;
        merge_hot_adapter: in fp32, batches whose rows all use one adapter may run on its merged weights (lora.merged)."""
        self.base = base
        on_cpu = base.device.type == "cpu" and base.dtype in (torch.bfloat16, torch.float32)
        kernels = CpuKernels.try_load() if cpu_kernels and on_cpu else None
        attention = kernels if kernels is not None and kernels.runs_bf16 and base.dtype == torch.bfloat16 else None
        prepacked = prepack_linears(base.model, base.dtype, base.device) if prepack else 0
        self.encoder_path = encoder_path(base.model, attention, padding_free)  # the family registry (engine.packed)
        self.packed = self.encoder_path.encoder
        fused_gpu = _fused_gpu() if gpu_lora_kernel and base.device.type == "cuda" else None
        self.lora = LoraLayers(base.model, n_slots, max_rank, kernels, fused_gpu, merge=merge_hot_adapter)
        self.kernel_paths = operation_paths(  # which path each operation runs: the metric and the startup line
            lora=self.lora.backend.kernel,
            attention=self.packed is not None and self.packed.kernels is not None, linears=prepacked > 0,
        )
        self.heads = HeadPool(n_slots, base.spec.hidden_size, max_labels, base.device)
        self.pad_id = int(base.tokenizer.pad_token_id or 0)

    def _pad(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batches of several rows get widths in multiples of 8, so that they share matmul shapes (see
        packed.token_bucket); a single row keeps its own length (at most max_tokens shapes, and a short
        request's latency is mostly its padding)."""
        longest = max(len(r.input_ids) for r in rows)
        width = longest if len(rows) == 1 else -(-longest // 8) * 8
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):  # numpy rows: far cheaper than per-row torch ops
            ids[i, : len(row.input_ids)] = row.input_ids
            mask[i, : len(row.input_ids)] = 1
        return torch.from_numpy(ids).to(self.base.device), torch.from_numpy(mask).to(self.base.device)

    @torch.inference_mode()
    def __call__(self, rows: list[Row]) -> list[RowResult]:
        ids, mask = self._pad(rows)
        packing = self._packing(mask)
        self.lora.prepare([r.lora_slot for r in rows], self.base.device, packing)  # the batch's mapping, once
        try:
            out = self._encode(ids, mask, packing, pooler=any(self.heads.reads_pooler(s) for r in rows for s in r.head_slots))
        finally:
            self.lora.prepare([], self.base.device)
        results = [RowResult() for _ in rows]
        self._embeddings(rows, out.last_hidden_state, mask, results)
        self._classify(rows, out, ids, mask, results)
        return results

    def _packing(self, mask: torch.Tensor) -> Packing | None:
        """The packed-batch object when this batch runs padding-free, else None.

        Padding-free only when padding would cost more than packing does (batches of similar lengths stay
        padded), and always with the CPU kernels, whose packed attention beats a grid even without pads."""
        if self.packed is None:
            return None
        min_waste = 1.0 if self.packed.kernels is not None else PACKING_MIN_WASTE
        return None if mask.numel() < min_waste * int(mask.sum()) else Packing.from_mask(mask)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, packing: Packing | None, pooler: bool) -> object:
        if packing is None or self.packed is None:
            return self.base.model(input_ids=ids, attention_mask=mask)
        return self.packed(ids, mask, packing, pooler=pooler)

    def _embeddings(self, rows: list[Row], hidden: torch.Tensor, mask: torch.Tensor, results: list[RowResult]) -> None:
        for mode in {r.pooling for r in rows if r.pooling is not None}:
            idx = [i for i, r in enumerate(rows) if r.pooling == mode]
            every_row = len(idx) == len(rows)  # the common case: no copy of the grid
            skips = [rows[i].pool_skip for i in idx]
            skip = torch.tensor(skips, device=mask.device) if any(skips) else None
            vectors = pool(hidden, mask, mode, skip) if every_row else pool(hidden[idx], mask[idx], mode, skip)
            unit, raw = normalize(vectors).cpu().numpy(), vectors.cpu().numpy()  # one copy each, rows are views
            for j, i in enumerate(idx):
                results[i].embedding = unit[j] if rows[i].normalize else raw[j]

    def _head_features(
        self, out: object, ids: torch.Tensor, mask: torch.Tensor, row_of: list[int], slot_of: list[int]
    ) -> torch.Tensor:
        """Each (row, head) pair's input: BERT's pooler or a pooling of the row's states, normalized if the head asks.

        A decoder head reads the last token that is not the pad id, as transformers' *ForSequenceClassification
        does (it differs from the last attended token when pad = eos and the text ends with eos).
        """
        hidden = out.last_hidden_state  # type: ignore[attr-defined]
        features = torch.empty(len(row_of), hidden.shape[-1], device=hidden.device)  # [pairs, H]
        codes = [self.heads.input_code[slot] for slot in slot_of]
        for code in set(codes):
            part = [j for j, c in enumerate(codes) if c == code]
            sel = [row_of[j] for j in part]
            if code == HEAD_INPUT_CODES["pooler"]:
                feats = out.pooler_output[sel].float()  # type: ignore[attr-defined]
            elif HEAD_INPUT_POOLING[code] is Pooling.LAST_TOKEN:
                feats = pool(hidden[sel], without_pad_tokens(mask[sel], ids[sel], self.pad_id), Pooling.LAST_TOKEN)
            else:
                feats = pool(hidden[sel], mask[sel], HEAD_INPUT_POOLING[code])
            features[part] = feats
        norm = torch.tensor([self.heads.normalize_input[slot] for slot in slot_of], device=hidden.device)
        return torch.where(norm.unsqueeze(1), normalize(features), features)

    def _classify(
        self, rows: list[Row], out: object, ids: torch.Tensor, mask: torch.Tensor, results: list[RowResult]
    ) -> None:
        """Every head of every row, scored per size class of heads (heads.py): (row, head) pairs, not a loop over adapters."""
        pairs = [(i, slot) for i, r in enumerate(rows) for slot in r.head_slots]
        if not pairs:
            return
        row_of, slot_of = [p[0] for p in pairs], [p[1] for p in pairs]
        features = self._head_features(out, ids, mask, row_of, slot_of)
        probs = self.heads.probabilities(features, slot_of)
        for j, i in enumerate(row_of):
            results[i].probabilities.append(probs[j].numpy())
