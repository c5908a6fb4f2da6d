"""Training benchmark: time-to-accuracy of adaptgate's jobs against the peers a user would pick.

  (a) sentence-transformers embeddings + scikit-learn LogisticRegression   vs  our `head` job
  (b) Hugging Face Trainer + PEFT LoRA (r=8 on query/value, lr 2e-4,
      batch 32, fp32, max 64 tokens)                                     vs  our `lora` / `auto` jobs

Two views, both printed as one JSON object per line and a summary:
  curve  In this process, same threads for everyone: test accuracy after each evaluation against
         training seconds (time spent scoring the test split excluded), so "seconds to 83.4%" is
         comparable between the Trainer and our trainer. Our time includes our own validation passes.
  e2e    Through a real gateway (local Ray; the job's worker gets --training-cpus): SubmitJob ->
         SUCCEEDED wall time, then the test accuracy of the published adapter through Classify.

Examples (the full run is the default and the longest section of `make bench`):
  .venv/bin/python bench/training.py
  .venv/bin/python bench/training.py --datasets sst2 --train-rows 4000 --hf-max-seconds 120 --curve lora,hf-peft --e2e head
Not a test: its figures, with the command that printed them, go to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from corpora import dataset_dir

REPO = Path(__file__).resolve().parents[1]
TARGETS = (0.834, 0.86)  # the HF Trainer's best on SST-2 (3 epochs), and the bar set for `auto`


@dataclass
class Data:
    name: str
    train_texts: list[str]
    train_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]


@dataclass
class Outcome:
    system: str
    dataset: str
    seconds: float  # training wall time (curve) or SubmitJob -> SUCCEEDED (e2e)
    accuracy: float  # final test accuracy
    curve: list[tuple[float, float]] = field(default_factory=list)  # (training seconds, test accuracy)
    note: str = ""

    def seconds_to(self, target: float) -> float | None:
        return next((s for s, acc in self.curve if acc >= target), None)

    def as_json(self) -> str:
        out = {k: v for k, v in self.__dict__.items()}
        out["seconds_to"] = {f"{t:.3f}": self.seconds_to(t) for t in TARGETS}
        return json.dumps(out)


def load(name: str, train_rows: int, test_rows: int) -> Data:
    folder = dataset_dir(name)
    if folder is None:
        raise SystemExit(f"dataset {name!r} not found in examples/data or ADAPTGATE_BENCH_DATASETS")

    def read(split: str, limit: int) -> tuple[list[str], list[str]]:
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines() if line]
        rows = rows[:limit] if limit else rows
        return [r["text"] for r in rows], [r["label"] for r in rows]

    return Data(name, *read("train", train_rows), *read("test", test_rows))


def accuracy(predicted: list[str], truth: list[str]) -> float:
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


# ----- peers ----------------------------------------------------------------------------------------


def st_logreg(data: Data) -> Outcome:
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    from adaptgate.engine.device import cpu_has_fast_bf16
    from adaptgate.engine.model import packaged_model_dir

    began = time.perf_counter()
    model = SentenceTransformer(str(packaged_model_dir()), device="cpu")
    if cpu_has_fast_bf16():
        model = model.to(torch.bfloat16)
    x = model.encode(data.train_texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    clf = LogisticRegression(max_iter=1000).fit(x.astype("float32"), data.train_labels)
    seconds = time.perf_counter() - began
    test = model.encode(data.test_texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    score = accuracy(list(clf.predict(test.astype("float32"))), data.test_labels)
    return Outcome("st+logreg", data.name, seconds, score, [(seconds, score)])


def hf_peft(data: Data, epochs: float, max_seconds: float, eval_every: int) -> Outcome:
    """The Trainer a user would write: PEFT LoRA r=8 on query/value, lr 2e-4, batch 32, fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from adaptgate.engine.model import packaged_model_dir

    names = sorted(set(data.train_labels))
    index = {n: i for i, n in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(packaged_model_dir())
    began = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(packaged_model_dir(), num_labels=len(names), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
    encoded = tokenizer(data.train_texts, truncation=True, max_length=64)
    train = [{"input_ids": ids, "attention_mask": m, "labels": index[y]}
             for ids, m, y in zip(encoded["input_ids"], encoded["attention_mask"], data.train_labels)]
    test_batches = [tokenizer(data.test_texts[i : i + 128], truncation=True, max_length=64, padding=True, return_tensors="pt")
                    for i in range(0, len(data.test_texts), 128)]
    clock = {"paused": 0.0}
    curve: list[tuple[float, float]] = []

    def test_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            predicted = [names[int(i)] for batch in test_batches for i in model(**batch).logits.argmax(-1)]
        model.train()
        return accuracy(predicted, data.test_labels)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            elapsed = time.perf_counter() - began - clock["paused"]
            if state.global_step % eval_every == 0:
                paused = time.perf_counter()
                curve.append((elapsed, test_accuracy()))
                clock["paused"] += time.perf_counter() - paused
            if max_seconds and elapsed > max_seconds:
                control.should_training_stop = True
            return control

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=32, learning_rate=2e-4, num_train_epochs=epochs,
            report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no", use_cpu=True,
            disable_tqdm=True, seed=0, dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                callbacks=[Clock()]).train()
    seconds = time.perf_counter() - began - clock["paused"]
    final = test_accuracy()
    curve.append((seconds, final))
    return Outcome("hf-trainer+peft", data.name, seconds, max(a for _, a in curve), curve,
                   note=f"best of the curve (final {final:.4f}); {epochs} epoch(s), cap {max_seconds or 'none'} s")


# ----- ours, in process ---------------------------------------------------------------------------------


def ours_curve(data: Data, method: str, max_steps: int, epochs: int) -> Outcome:
    from adaptgate.engine.model import packaged_model_dir
    from adaptgate.training.methods.lora import LoraParams, _Trainer
    from adaptgate.training.methods.lora_data import tokenize

    began = time.perf_counter()
    clock = {"paused": 0.0}
    curve: list[tuple[float, float]] = []
    holder: dict[str, _Trainer] = {}

    def score_test() -> float:
        trainer = holder["trainer"]
        test_rows = list(range(len(trainer.ids) - len(data.test_texts), len(trainer.ids)))
        return trainer.evaluate(test_rows).accuracy

    def report(update: dict) -> None:
        if update["kind"] == "eval" and "trainer" in holder and update["message"].startswith("step "):
            paused = time.perf_counter()
            curve.append((paused - began - clock["paused"], score_test()))
            clock["paused"] += time.perf_counter() - paused
        if update["kind"] in ("eval", "log"):
            print(f"  [{method}] {update['message'][:160]}", file=sys.stderr, flush=True)

    params = LoraParams(auto=method == "auto", max_steps=max_steps, epochs=epochs)
    trainer = _Trainer(data.train_texts, data.train_labels, str(packaged_model_dir()), params, report)
    # Test rows ride along after the training rows (never in a training batch: the split covers train rows only).
    trainer.ids += tokenize(trainer.base.tokenizer, data.test_texts, 64)
    trainer.lengths = [len(r) for r in trainer.ids]
    index = {n: i for i, n in enumerate(trainer.names)}
    trainer.y = torch.cat([trainer.y, torch.tensor([index[label] for label in data.test_labels])])
    holder["trainer"] = trainer
    result = trainer.run()
    seconds = time.perf_counter() - began - clock["paused"]
    final = score_test()  # the kept (best-validation) weights: what the job publishes
    return Outcome(f"adaptgate-{method}", data.name, seconds, final, curve,
                   note=f"{result.steps} steps; published weights of the best validation step")


# ----- ours, through a gateway ---------------------------------------------------------------------------


def start_gateway(data_dir: Path, training_cpus: int) -> tuple[subprocess.Popen[str], str]:
    tokens = data_dir / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"bench": {"tenant": "bench"}}}))
    cmd = [sys.executable, "-m", "adaptgate.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--http-port", "0",
           "--data-dir", str(data_dir), "--tokens-file", str(tokens), "--training-cpus", str(training_cpus),
           "--max-texts-per-request", "300"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            import threading

            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return proc, f"127.0.0.1:{match[1]}"
    raise RuntimeError("the gateway did not start")


def ours_e2e(target: str, data: Data, method: str, tmp: Path, max_steps: int) -> Outcome:
    from adaptgate.client import Client
    from adaptgate.v1 import finetune_pb2

    client = Client(target, "bench", timeout=600)
    path = tmp / f"{data.name}-{method}.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(data.train_texts, data.train_labels)))
    dataset = client.upload_dataset(path, name=path.stem)
    began = time.perf_counter()
    request = finetune_pb2.SubmitJobRequest(dataset_id=dataset.id, adapter_name=f"{data.name.replace('_', '-')}-{method}",
                                            method=method, alias="prod", max_steps=max_steps)
    job = client.finetune.SubmitJob(request, metadata=client.metadata)
    last = None
    for last in client.watch_job(job.id):
        if last.kind in ("eval", "log", "state"):
            print(f"  [e2e {method}] {time.perf_counter() - began:6.1f}s {last.message[:150]}", file=sys.stderr, flush=True)
    trained = time.perf_counter() - began
    if last is None or last.state != finetune_pb2.SUCCEEDED:
        return Outcome(f"adaptgate-{method}-e2e", data.name, trained, 0.0, note=f"job ended: {last.message if last else '?'}")
    adapter = f"{request.adapter_name}:prod"
    client.classify(data.test_texts[:1], adapter, truncate=True)
    serving = time.perf_counter() - began
    predicted = []
    for start in range(0, len(data.test_texts), 300):
        predicted += [r.label for r in client.classify(data.test_texts[start : start + 300], adapter, truncate=True).results]
    score = accuracy(predicted, data.test_labels)
    chosen = f"; auto chose {job.method}" if job.auto else ""
    return Outcome(f"adaptgate-{method}-e2e", data.name, trained, score, [(trained, score)],
                   note=f"SubmitJob->SUCCEEDED {trained:.1f} s, ->first Classify {serving:.1f} s{chosen}")


# ----- driver -----------------------------------------------------------------------------------------


def summary(outcomes: list[Outcome]) -> str:
    lines = [f"{'system':24} {'dataset':10} {'seconds':>8} {'accuracy':>9} " + " ".join(f"{'s to ' + format(t, '.1%'):>10}" for t in TARGETS)]
    for o in outcomes:
        reach = " ".join(f"{(format(s, '.0f') if (s := o.seconds_to(t)) is not None else '-'):>10}" for t in TARGETS)
        lines.append(f"{o.system:24} {o.dataset:10} {o.seconds:8.1f} {o.accuracy:9.4f} {reach}  {o.note}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="sst2,ag_news")
    parser.add_argument("--train-rows", type=int, default=20000, help="first N training rows (AG News has 17,291)")
    parser.add_argument("--test-rows", type=int, default=0, help="first N test rows (0 = all)")
    parser.add_argument("--curve", default="st-logreg,hf-peft,lora,auto", help="in-process systems")
    parser.add_argument("--e2e", default="head,auto", help="methods run through a gateway")
    parser.add_argument("--hf-epochs", type=float, default=3.0)
    parser.add_argument("--hf-max-seconds", type=float, default=0.0, help="stop the Trainer after this much training")
    parser.add_argument("--hf-eval-every", type=int, default=100, help="Trainer steps between test evaluations")
    parser.add_argument("--max-steps", type=int, default=0, help="cap our lora/auto jobs (0 = their default plan)")
    parser.add_argument("--epochs", type=int, default=0, help="our lora/auto epochs (0 = their default plan)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--training-cpus", type=int, default=2, help="CPUs the gateway gives one job (e2e)")
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    outcomes: list[Outcome] = []

    def record(outcome: Outcome) -> None:
        outcomes.append(outcome)
        print(outcome.as_json(), flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(outcome.as_json() + "\n")

    curve: dict[str, Callable[[Data], Outcome]] = {
        "st-logreg": st_logreg,
        "hf-peft": lambda d: hf_peft(d, args.hf_epochs, args.hf_max_seconds, args.hf_eval_every),
        "lora": lambda d: ours_curve(d, "lora", args.max_steps, args.epochs),
        "auto": lambda d: ours_curve(d, "auto", args.max_steps, args.epochs),
    }
    datasets = [load(name, args.train_rows, args.test_rows) for name in args.datasets.split(",") if name]
    for data in datasets:
        for system in filter(None, args.curve.split(",")):
            record(curve[system](data))
    methods = [m for m in args.e2e.split(",") if m]
    if methods:
        with tempfile.TemporaryDirectory() as tmp:
            proc, target = start_gateway(Path(tmp), args.training_cpus)
            try:
                for data in datasets:
                    for method in methods:
                        record(ours_e2e(target, data, method, Path(tmp), args.max_steps))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    print(summary(outcomes))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
