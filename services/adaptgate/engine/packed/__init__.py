"""Padding-free forward for BERT-style encoders (the TEI idea, in plain PyTorch).

Short texts in one batch differ in length: padded to the longest, most of a batch of short sentences'
matmul work goes to pad tokens. Here every linear layer (where most of the FLOPs are) runs on the
packed real tokens `[T, H]` only; just attention, which needs the `[B, heads, L, d]` layout, sees a
padded grid, and that in up to four length groups (`attention_groups`). BatchForward packs a batch
only when it carries enough padding to pay for the gathers and scatters (`PACKING_MIN_WASTE`).
Rows stay contiguous in the packed layout (pads are on the right), so LoRA backends can cut each
row's tokens into equal chunks for their gathered matmuls (engine.lora.reference).

On a CPU with engine.cpu_kernels, attention too runs on the packed tokens.

`Packing` is the packed-batch object (token positions, row starts and lengths); `registry` maps a
model class to its packed encoder. Every family without one runs its transformers forward; tests
hold both paths to the same outputs.
"""

from adaptgate.engine.packed.attention import GROUPING_MIN_GAIN, MAX_ATTENTION_GROUPS, AttentionGroup, attention_groups
from adaptgate.engine.packed.batch import EncoderOutput, Packing, row_spans, token_bucket
from adaptgate.engine.packed.bert import PackedBertEncoder
from adaptgate.engine.packed.registry import PACKED_ENCODERS, EncoderPath, PackedEncoder, encoder_path, supports_packing

__all__ = [
    "GROUPING_MIN_GAIN",
    "MAX_ATTENTION_GROUPS",
    "PACKED_ENCODERS",
    "AttentionGroup",
    "EncoderOutput",
    "EncoderPath",
    "PackedBertEncoder",
    "PackedEncoder",
    "Packing",
    "attention_groups",
    "encoder_path",
    "row_spans",
    "supports_packing",
    "token_bucket",
]
