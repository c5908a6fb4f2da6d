"""Many tenants in one forward pass: adaptgate mixed-adapter vs base-only vs PEFT mixed batches.

Packaged all-MiniLM-L6-v2, bf16 where the CPU has it, 64 LoRA adapters r=8 on query/key/value/dense,
each with its own 2-label head, 32-row batches whose rows pick adapters at random. The same
adapters (saved by PEFT, loaded by adaptgate from those files) and the same batches on both sides.
Also: adapter load-to-live latency through the store and cache (cache miss to a live slot).
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
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row

REPO = Path(__file__).resolve().parents[1]


def load_texts(n: int) -> list[str]:
    source = REPO.parent / "shared" / "datasets" / "sst2" / "train.jsonl"
    if not source.exists():
        source = REPO / "examples" / "data" / "sms_spam" / "train.jsonl"
    return [json.loads(line)["text"] for line in source.read_text().splitlines()[:n]]


def make_peft_model(n_adapters: int, rank: int, out: Path, dtype: torch.dtype):
    """One PEFT model holding every adapter (what PEFT's mixed batches need), saved for adaptgate too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(packaged_model_dir(), num_labels=2)
    config = LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                        target_modules=["query", "key", "value", "dense"])
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, n_adapters):
        peft_model.add_adapter(f"a{i}", config)
    peft_model.save_pretrained(out)
    return peft_model.to(dtype).eval()


def adapter_dirs(out: Path, n: int) -> list[Path]:
    return [out / f"a{i}" for i in range(n)]


def batches_of(texts: list[str], tokenizer, batch: int, n_adapters: int, seed: int = 0, by_length: bool = False):
    """32-row batches of random adapters; `by_length` sorts rows first, as the engine's batcher does under load."""
    rng = random.Random(seed)
    ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    if by_length:
        ids = sorted(ids, key=len)
    chunks = [ids[i : i + batch] for i in range(0, len(ids) - batch + 1, batch)]
    return [(chunk, [rng.randrange(n_adapters) for _ in chunk]) for chunk in chunks]


def time_it(fn, batches) -> float:
    started = time.perf_counter()
    for b in batches:
        fn(*b)
    return sum(len(b[0]) for b in batches) / (time.perf_counter() - started)


def interleaved_rates(systems: dict, batches, repeats: int) -> dict[str, float]:
    """Median sequences/s per system over `repeats` rounds that take turns (a shared VM's noise hits all alike)."""
    for fn in systems.values():
        fn(*batches[0])
    runs: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(repeats):
        for name, fn in systems.items():
            runs[name].append(time_it(fn, batches))
    return {name: float(np.median(r)) for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    args = parser.parse_args()

    from adaptgate.adapters.validation import AdapterValidator
    from adaptgate.engine.engine import HeadWeights
    from adaptgate.engine.forward import BatchForward

    base = load_base_model()
    texts = load_texts(args.texts)
    batches = batches_of(texts, base.tokenizer, args.batch, args.adapters)
    forward = BatchForward(base, args.adapters, args.rank, 2)
    validator = AdapterValidator(base.spec, args.rank, 2)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model = make_peft_model(args.adapters, args.rank, Path(tmp), base.dtype)
        for slot, directory in enumerate(adapter_dirs(Path(tmp), args.adapters)):
            files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != "README.md"}
            w = validator.parse(files)
            forward.lora.install(slot, w.lora, w.scaling)
            forward.heads.install(slot, w.head_weight, w.head_bias, w.head_input, w.normalize_head_input)
        load_p99 = measure_load_latency(Path(tmp), base, args)

    def base_only(ids, slots):
        forward([Row(i, pooling=Pooling.MEAN) for i in ids])

    def mixed(ids, slots):
        forward([Row(i, lora_slot=s, head_slots=(s,)) for i, s in zip(ids, slots)])

    def peft_mixed(ids, slots):
        padded = base.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        with torch.inference_mode():
            peft_model(**padded, adapter_names=[f"a{s}" for s in slots])

    rates = interleaved_rates({"base": base_only, "mixed": mixed, "peft": peft_mixed}, batches, args.repeats)
    print(f"model {base.name} {str(base.dtype).removeprefix('torch.')}, {args.adapters} adapters r={args.rank}, "
          f"{args.batch}-row batches, {len(batches) * args.batch} texts")
    print(f"adaptgate base-only:   {rates['base']:8.1f} sequences/s")
    print(f"adaptgate mixed:       {rates['mixed']:8.1f} sequences/s  ({rates['mixed'] / rates['base']:.2f}x base-only)")
    print(f"PEFT mixed batch:      {rates['peft']:8.1f} sequences/s  (adaptgate mixed = {rates['mixed'] / rates['peft']:.1f}x PEFT)")
    grouped = batches_of(texts, base.tokenizer, args.batch, args.adapters, by_length=True)
    sorted_rates = interleaved_rates({"base": base_only, "mixed": mixed}, grouped, args.repeats)
    print(f"length-sorted batches (what the batcher forms from many requests): base-only {sorted_rates['base']:.1f}, "
          f"mixed {sorted_rates['mixed']:.1f} sequences/s ({sorted_rates['mixed'] / sorted_rates['base']:.2f}x)")
    print(f"adapter load-to-live p99: {load_p99 * 1000:.1f} ms")


def measure_load_latency(peft_dir: Path, base, args) -> float:
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
            engine = Engine(load_base_model(), EngineConfig(n_slots=args.adapters, max_rank=args.rank, max_labels=2))
            engine.start()
            cache = AdapterCache(store, engine, args.adapters, Metrics())
            latencies = []
            for i in range(args.adapters):
                started = time.perf_counter()
                await cache.load(AdapterRef("bench", f"a{i}"))
                latencies.append(time.perf_counter() - started)
            await engine.stop()
            return latencies

    return float(np.percentile(asyncio.run(run()), 99))


if __name__ == "__main__":
    main()
