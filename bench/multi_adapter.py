"""Many tenants in one forward pass: adaptgate mixed-adapter vs base-only vs PEFT mixed batches.

Packaged all-MiniLM-L6-v2, bf16 where the CPU has it, 64 LoRA adapters r=8 on query/key/value/dense,
each with its own 2-label head, 32-row batches whose rows pick adapters at random. The same
adapters (saved by PEFT, loaded by adaptgate from those files) and the same batches on both sides.
Also: adapter load-to-live latency through the store and cache (cache miss to a live slot), and
model FLOP utilisation against this device's own measured bf16 matmul peak.

GPU run (the figures to compare on a GPU): `--bert-base --seq-len 128 --batch 256 --rank 16` builds a randomly
initialised BERT-base-sized encoder (768 hidden, 12 layers) and feeds fixed-length synthetic rows.
On CUDA the mixed batches run on both LoRA paths in the same rounds: the gathered bmm, and
engine.lora.triton_gemm's fused GEMM (written without a GPU at hand: this A/B is its first measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adaptgate.engine.model import load_base_model, packaged_model_dir
from corpora import split_file
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row

REPO = Path(__file__).resolve().parents[1]


def load_texts(n: int) -> list[str]:
    source = split_file("sst2") or split_file("sms_spam")
    assert source is not None, "examples/data/sms_spam is part of the repository"
    return [json.loads(line)["text"] for line in source.read_text().splitlines()[:n]]


def make_bert_base(out: Path) -> Path:
    """A random BERT-base-sized encoder with the packaged tokenizer: the GPU benchmark's model."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    BertModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(packaged_model_dir()).save_pretrained(out)
    return out


def make_peft_model(model_dir: Path, n_adapters: int, rank: int, out: Path, dtype: torch.dtype, device: torch.device):
    """One PEFT model holding every adapter (what PEFT's mixed batches need), saved for adaptgate too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                        target_modules=["query", "key", "value", "dense"])
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, n_adapters):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.save_pretrained(out)
    return peft_model.to(device=device, dtype=dtype).eval()


def adapter_dirs(out: Path, n: int) -> list[Path]:
    return [out / f"a{i}" for i in range(n)]


def batches_of(
    texts: list[str], tokenizer, batch: int, n_adapters: int, seed: int = 0, by_length: bool = False, seq_len: int = 0
):
    """Batches of random adapters; `by_length` sorts rows first, as the engine's batcher does under load;
    `seq_len` > 0 replaces the texts by synthetic rows of exactly that many tokens."""
    rng = random.Random(seed)
    ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    if seq_len:
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        ids = [[cls] + [rng.randrange(1000, 30000) for _ in range(seq_len - 2)] + [sep] for _ in ids]
    if by_length:
        ids = sorted(ids, key=len)
    chunks = [ids[i : i + batch] for i in range(0, len(ids) - batch + 1, batch)]
    return [(chunk, [rng.randrange(n_adapters) for _ in chunk]) for chunk in chunks]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_it(fn, batches) -> tuple[float, float]:
    """(sequences/s, CPU seconds): CPU time leaves out what a busy VM host steals, so its ratios are steadier."""
    synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    for b in batches:
        fn(*b)
    synchronize()
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - started), time.process_time() - cpu_started


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one large square matmul on this device: the MFU denominator (measured, not a datasheet's).
    The best of five timings, so that a moment of VM noise does not shrink the peak and inflate MFU."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    rounds, best = (20 if device.type == "cuda" else 3), 0.0
    for _ in range(5):
        synchronize()
        started = time.perf_counter()
        for _ in range(rounds):
            a @ b
        synchronize()
        best = max(best, 2 * n**3 * rounds / (time.perf_counter() - started))
    return best


def flops_per_sequence(config, tokens: float) -> float:
    """Linear layers (2 x weights per token) plus attention (QKᵀ and AV: 4 x L² x H per layer)."""
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    return layers * (2 * tokens * (4 * hidden * hidden + 2 * hidden * inner) + 4 * tokens * tokens * hidden)


def interleaved_rates(systems: dict, batches, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median sequences/s and median CPU seconds per system over `repeats` rounds that take turns
    (a shared VM's noise hits all alike)."""
    for fn in systems.values():
        fn(*batches[0])
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            runs[name].append(time_it(fn, batches))
    rates = {name: float(np.median([r[0] for r in rs])) for name, rs in runs.items()}
    return rates, {name: float(np.median([r[1] for r in rs])) for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--large-head", type=int, default=1000, help="also time mixed batches where one adapter's head has this many labels (0: skip)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--bert-base", action="store_true", help="a random BERT-base-sized encoder instead of MiniLM")
    parser.add_argument("--seq-len", type=int, default=0, help="synthetic rows of exactly this many tokens (0 = real texts)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--cpu-kernels", default="auto", choices=("auto", "off"), help="off: PyTorch ops on CPU too (the A/B)")
    parser.add_argument("--triton-blocks", nargs="*", default=[], metavar="M,N,K,WARPS,STAGES",
                        help="on CUDA: also run the fused Triton GEMM with these tile shapes (the default one always runs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as models:
        run(args, make_bert_base(Path(models) / "bert-base-random") if args.bert_base else packaged_model_dir())


def run(args: argparse.Namespace, model_dir: Path) -> None:

    from adaptgate.adapters.validation import AdapterValidator
    from adaptgate.engine.engine import HeadWeights
    from adaptgate.engine.forward import BatchForward

    base = load_base_model(model_dir, device=args.device)
    texts = load_texts(args.texts)
    batches = batches_of(texts, base.tokenizer, args.batch, args.adapters, seq_len=args.seq_len)
    # One more slot when --large-head is set: adapter 0's LoRA with a head of that many labels.
    forward = BatchForward(
        base, args.adapters + bool(args.large_head), args.rank, max(2, args.large_head),
        cpu_kernels=args.cpu_kernels == "auto", gpu_lora_kernel=base.device.type == "cuda",
    )
    validator = AdapterValidator(base.spec, args.rank, 2)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model = make_peft_model(model_dir, args.adapters, args.rank, Path(tmp), base.dtype, base.device)
        for slot, directory in enumerate(adapter_dirs(Path(tmp), args.adapters)):
            files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != "README.md"}
            w = validator.parse(files)
            forward.lora.install(slot, w.lora, w.scaling)
            forward.heads.install(slot, w.head_weight, w.head_bias, w.head_input, w.normalize_head_input)
            if slot == 0 and args.large_head:
                forward.lora.install(args.adapters, w.lora, w.scaling)
                hidden = w.head_weight.shape[1]
                forward.heads.install(args.adapters, torch.randn(args.large_head, hidden) / hidden**0.5,
                                      torch.zeros(args.large_head), w.head_input, w.normalize_head_input)
        report_rates(args, base, forward, peft_model, batches, texts)
        # Last: the Engine it builds leaves this (main) thread single-threaded for torch (engine.thread).
        latencies = measure_load_latency(Path(tmp), model_dir, base, args)
        print(f"adapter load-to-live: p99 {np.percentile(latencies, 99) * 1000:.1f} ms, p50 {np.median(latencies) * 1000:.1f} ms, "
              f"first {latencies[0] * 1000:.1f} ms (it also allocates every targeted layer's slot buffers)")


def report_rates(args: argparse.Namespace, base, forward, peft_model, batches, texts: list[str]) -> None:
    def base_only(ids, slots):
        forward([Row(i, pooling=Pooling.MEAN) for i in ids])

    def mixed(ids, slots):
        forward([Row(i, lora_slot=s, head_slots=(s,)) for i, s in zip(ids, slots)])

    def peft_mixed(ids, slots):
        padded = base.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(base.device)
        with torch.inference_mode():
            peft_model(**padded, adapter_names=[f"a{s}" for s in slots])

    systems = {"base": base_only, "mixed": on_lora_path(forward, None, mixed), "peft": peft_mixed}
    fused = forward.lora.backend.gemm if forward.lora.path == "fused Triton GEMM" else None
    if fused is not None:  # the A/B on a GPU: "mixed" on the gathered bmm, "fused ..." on the Triton GEMM
        systems.update(fused_systems(forward, fused, args.triton_blocks, mixed, batches[0]))
    peak_before = matmul_peak(base.device, base.dtype)  # and again after: the VM's noisy spells come and go
    rates, cpu = interleaved_rates(systems, batches, args.repeats)
    peak = max(peak_before, matmul_peak(base.device, base.dtype))
    tokens = float(np.mean([len(i) for b in batches for i in b[0]]))
    mfu = {name: rate * flops_per_sequence(base.model.config, tokens) / peak for name, rate in rates.items()}
    print(f"model {base.name} {str(base.dtype).removeprefix('torch.')} on {base.device}, {args.adapters} adapters "
          f"r={args.rank} (LoRA by {forward.lora.path if fused is None else 'gathered bmm and fused Triton GEMM'}), {args.batch}-row batches, {len(batches) * args.batch} rows of {tokens:.1f} tokens; "
          f"measured matmul peak {peak / 1e12:.2f} TFLOP/s")
    print(f"adaptgate base-only:   {rates['base']:8.1f} sequences/s  MFU {mfu['base']:.1%}")
    print(f"adaptgate mixed:       {rates['mixed']:8.1f} sequences/s  ({rates['mixed'] / rates['base']:.2f}x base-only"
          f"{cpu_ratio(base.device, cpu, 'mixed', 'base')})  MFU {mfu['mixed']:.1%}")
    for name in (n for n in rates if n.startswith("fused")):
        print(f"adaptgate mixed, {name}: {rates[name]:8.1f} sequences/s  ({rates[name] / rates['base']:.2f}x base-only)"
              f"  MFU {mfu[name]:.1%}  (the line above: gathered bmm)")
    print(f"PEFT mixed batch:      {rates['peft']:8.1f} sequences/s  (adaptgate mixed = {rates['mixed'] / rates['peft']:.1f}x PEFT)")
    if args.large_head:
        report_large_head(args, forward, batches, mixed)
    grouped = batches_of(texts, base.tokenizer, args.batch, args.adapters, by_length=True, seq_len=args.seq_len)
    sorted_rates, sorted_cpu = interleaved_rates({"base": base_only, "mixed": systems["mixed"]}, grouped, args.repeats)
    print(f"length-sorted batches (what the batcher forms from many requests): base-only {sorted_rates['base']:.1f}, "
          f"mixed {sorted_rates['mixed']:.1f} sequences/s ({sorted_rates['mixed'] / sorted_rates['base']:.2f}x"
          f"{cpu_ratio(base.device, sorted_cpu, 'mixed', 'base')})")


def report_large_head(args: argparse.Namespace, forward, batches, mixed) -> None:
    """Mixed batches where adapter 0 answers with a --large-head-label head instead of its 2-label
    one (the other adapters keep theirs), against the same batches all small; and head memory per
    slot against a dense [slots, hidden, max_labels] layout."""
    large = args.adapters

    def one_large(ids, slots):
        mixed(ids, [large if s == 0 else s for s in slots])

    share = sum(s == 0 for b in batches for s in b[1]) / sum(len(b[1]) for b in batches)
    rates, _ = interleaved_rates({"small": on_lora_path(forward, None, mixed), "large": on_lora_path(forward, None, one_large)},
                                 batches, args.repeats)
    heads, slots = forward.heads, args.adapters + 1
    dense = slots * (forward.heads.classes[0].hidden + 1) * heads.max_labels * 4
    print(f"one {args.large_head}-label head among {args.adapters - 1} 2-label heads ({share:.1%} of rows): "
          f"{rates['large']:.1f} sequences/s = {rates['large'] / rates['small']:.3f}x all-small ({rates['small']:.1f}); "
          f"head memory {heads.nbytes() / slots / 1024:.1f} KiB per slot ({heads.nbytes() / 2**20:.2f} MiB in all; "
          f"a dense [slots, hidden, {heads.max_labels}] layout: {dense / slots / 1024:.1f} KiB per slot)")


def fused_systems(forward, fused, extra_blocks: list[str], mixed, first_batch) -> dict:
    """One system per tile shape of the fused Triton GEMM, each checked once first: a shape that fails to
    compile is reported and left out, so the rest of the figures still come back from a short device run."""
    from adaptgate.engine.lora.triton_gemm import Blocks, TritonLoraLinear

    systems = {}
    for blocks in [fused.blocks, *map(Blocks.parse, extra_blocks)]:
        name = f"fused Triton GEMM {blocks.m}x{blocks.n}x{blocks.k} w{blocks.warps} s{blocks.stages}"
        run = on_lora_path(forward, fused if blocks == fused.blocks else TritonLoraLinear(blocks), mixed)
        try:
            run(*first_batch)
        except Exception as exc:  # noqa: BLE001 - a bench: say why and go on
            print(f"{name}: failed, left out: {type(exc).__name__}: {exc}"[:500])
            continue
        systems[name] = run
    return systems


def on_lora_path(forward, fused, fn):
    """`fn` with the engine's LoRA backend switched to the fused Triton GEMM (`fused`) or to the gathered bmm (None)."""
    from adaptgate.engine.lora import GatheredBmm

    backend = forward.lora.backend  # the engine's own: the CPU kernel or the gathered bmm on a CPU
    if fused is not None:
        from adaptgate.engine.lora.triton_gemm import TritonGemm

        backend = TritonGemm(fused)
    elif backend.name == "fused Triton GEMM":
        backend = GatheredBmm()

    def run(ids, slots):
        forward.lora.use(backend)
        fn(ids, slots)

    return run


def cpu_ratio(device: torch.device, cpu: dict[str, float], name: str, reference: str) -> str:
    """`; 0.80x by CPU time` on a CPU run (same rows on both sides, so the rate ratio is the inverse time ratio)."""
    return f"; {cpu[reference] / cpu[name]:.2f}x by CPU time" if device.type == "cpu" else ""


def measure_load_latency(peft_dir: Path, model_dir: Path, base, args) -> list[float]:
    """Publish every adapter to a store, then time cache misses until each is live in a slot."""
    from adaptgate.adapters.cache import AdapterCache
    from adaptgate.adapters.refs import AdapterRef
    from adaptgate.adapters.store import AdapterStore
    from adaptgate.adapters.validation import AdapterValidator
    from adaptgate.engine.engine import Engine, EngineConfig
    from adaptgate.metrics import Metrics

    async def run() -> list[float]:
        with tempfile.TemporaryDirectory() as tmp:
            store = AdapterStore(Path(tmp), AdapterValidator(base.spec, args.rank, 2))
            for i, directory in enumerate(adapter_dirs(peft_dir, args.adapters)):
                files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != "README.md"}
                store.publish("bench", f"a{i}", files)
            engine = Engine(
                load_base_model(model_dir, device=args.device), EngineConfig(n_slots=args.adapters, max_rank=args.rank, max_labels=2)
            )
            engine.start()
            cache = AdapterCache(store, engine, args.adapters, Metrics())
            latencies = []
            for i in range(args.adapters):
                started = time.perf_counter()
                await cache.load(AdapterRef("bench", f"a{i}"))
                latencies.append(time.perf_counter() - started)
            await engine.stop()
            return latencies

    return asyncio.run(run())


if __name__ == "__main__":
    main()
