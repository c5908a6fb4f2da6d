"""Out-of-scope inputs: recall on a class never seen in training, at 95% in-scope precision.

    .venv/bin/python bench/out_of_scope.py            # AG News (not in the repository: docs/performance.md, Datasets)
    .venv/bin/python bench/out_of_scope.py --train 2000 --test 2000

AG News has four topics. Two are in scope (Sports, Business), one is the tenant's out-of-scope
examples at training time (World, relabelled "none"), and one is never seen at all (Sci/Tech): the
test's out-of-scope inputs. Both heads are trained by the `head` job's own code on the packaged model:

- before: a head on the in-scope rows only, answering every input (what a classifier without
  abstention does), and the same head's best possible threshold on the top score, chosen on the
  test itself (an upper bound for a threshold without out-of-scope training rows);
- after: a head with `out_of_scope_label="none"`, its threshold calibrated by the job on its own
  validation split; measured on the unseen class.

Prints out-of-scope recall (unseen inputs abstained on) and in-scope precision and coverage.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from adaptgate.engine.model import load_base_model, packaged_model_dir
from corpora import split_file
from adaptgate.training.methods.abstain import calibrate
from adaptgate.training.methods.head import HeadParams, HeadResult, train_head
from adaptgate.training.methods.head_embed import embed_texts

REPO = Path(__file__).resolve().parents[1]
IN_SCOPE, SEEN_OOS, UNSEEN_OOS = ("Sports", "Business"), "World", "Sci/Tech"


def rows(name: str, limit: int, seed: int) -> list[dict[str, str]]:
    path = split_file("ag_news", name)
    if path is None:
        raise SystemExit(f"AG News ({name}.jsonl) not found: set ADAPTGATE_BENCH_DATASETS to a folder holding ag_news/")
    data = [json.loads(line) for line in path.read_text().splitlines() if line]
    random.Random(seed).shuffle(data)
    return data[:limit]


def answer(result: HeadResult, features: torch.Tensor, threshold: float | None) -> tuple[list[str], torch.Tensor]:
    probs = torch.softmax(features @ result.weight.t() + result.bias, dim=1)
    top, index = probs.max(dim=1)
    labels = [result.labels[i] for i in index.tolist()]
    abstained = torch.tensor([label == "none" for label in labels]) | (top < threshold if threshold is not None else False)
    return labels, abstained


def report(name: str, truth: list[str], labels: list[str], abstained: torch.Tensor) -> None:
    inside = torch.tensor([t in IN_SCOPE for t in truth])
    answered_in = (~abstained & inside).sum().item()
    answered_out = (~abstained & ~inside).sum().item()
    correct = sum(1 for t, p, a in zip(truth, labels, abstained.tolist()) if t in IN_SCOPE and not a and p == t)
    print(f"{name:58} out-of-scope recall {(abstained & ~inside).sum().item() / max(1, (~inside).sum().item()):.3f}  "
          f"in-scope precision {answered_in / max(1, answered_in + answered_out):.3f}  "
          f"coverage {answered_in / max(1, inside.sum().item()):.3f}  accuracy {correct / max(1, inside.sum().item()):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=3000, help="training rows drawn from AG News train")
    parser.add_argument("--test", type=int, default=2000, help="test rows drawn from AG News test")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_dir = str(packaged_model_dir())
    train = [r for r in rows("train", args.train, args.seed) if r["label"] != UNSEEN_OOS]
    test = [r for r in rows("test", args.test, args.seed) if r["label"] in (*IN_SCOPE, UNSEEN_OOS)]
    in_scope = [r for r in train if r["label"] in IN_SCOPE]
    scoped = [{"text": r["text"], "label": r["label"] if r["label"] in IN_SCOPE else "none"} for r in train]
    params = HeadParams(seed=args.seed)
    quiet = lambda update: None  # noqa: E731
    before = train_head([r["text"] for r in in_scope], [r["label"] for r in in_scope], model_dir, params, quiet)
    after = train_head([r["text"] for r in scoped], [r["label"] for r in scoped], model_dir,
                       HeadParams(seed=args.seed, out_of_scope_label="none"), quiet)
    base = load_base_model(model_dir)
    features = embed_texts(base, [r["text"] for r in test], 64, lambda done, total: None)
    truth = [r["label"] for r in test]
    print(f"AG News: in scope {IN_SCOPE}, out-of-scope training rows {SEEN_OOS!r} ({len(scoped) - len(in_scope)}), "
          f"unseen at test {UNSEEN_OOS!r}; {len(in_scope)} in-scope training rows, {len(test)} test rows")
    labels, abstained = answer(before, features, None)
    report("before: no abstention", truth, labels, abstained)
    probs = torch.softmax(features @ before.weight.t() + before.bias, dim=1).max(dim=1).values
    inside = torch.tensor([t in IN_SCOPE for t in truth])
    oracle = calibrate(probs[inside], probs[~inside], "none")
    labels, abstained = answer(before, features, oracle.threshold)
    report(f"before: best top-score threshold on the test ({oracle.threshold:.3f})", truth, labels, abstained)
    assert after.abstain is not None
    labels, abstained = answer(after, features, after.abstain.threshold)
    report(f"after: out_of_scope_label, calibrated threshold ({after.abstain.threshold:.3f})", truth, labels, abstained)


if __name__ == "__main__":
    main()
