"""Per-call cost of AdapterStore.resolve and .get: the work every Classify/Embed admission does.

A store of one tenant with a few adapters, each with several versions and an alias, is laid out
on disk (version directories are written directly: resolution never reads the weights), then each
reference form is resolved in a loop. `--store-module` times another implementation of the store
(a file defining AdapterStore), to compare a change against the code before it.

    python bench/adapter_resolve.py [--store-module path/to/store.py] [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from adaptgate.adapters.refs import AdapterRef


def load_store_module(path: str | None) -> ModuleType:
    if path is None:
        import adaptgate.adapters.store as module

        return module
    spec = importlib.util.spec_from_file_location("adaptgate.adapters._bench_store", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def lay_out(module: ModuleType, root: Path, adapters: int, versions: int) -> object:
    store = module.AdapterStore(root, validator=None)
    for a in range(adapters):
        adapter_dir = root / "acme" / f"a{a}"
        for v in range(1, versions + 1):
            record = module.AdapterRecord("acme", f"a{a}", v, ["neg", "pos"], 4, ["query"], 1024, time.time(), "bench")
            (adapter_dir / f"v{v}").mkdir(parents=True)
            (adapter_dir / f"v{v}" / module.RECORD_FILE).write_text(json.dumps(record.__dict__))
        (adapter_dir / module.VERSION_FILE).write_text(json.dumps({"last": versions}))
        store.set_alias(AdapterRef("acme", f"a{a}", 1), "prod")
    return store


def per_call_in_thread_us(fn, ref: AdapterRef, calls: int) -> float:
    """As AdapterCache calls it on every lease: in a worker thread, awaited from the event loop."""

    async def run() -> float:
        await asyncio.to_thread(fn, ref)
        started = time.perf_counter()
        for _ in range(calls):
            await asyncio.to_thread(fn, ref)
        return (time.perf_counter() - started) / calls * 1e6

    return asyncio.run(run())


def per_call_us(fn, ref: AdapterRef, calls: int) -> float:
    fn(ref)
    started = time.perf_counter()
    for _ in range(calls):
        fn(ref)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store-module", default=None)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--versions", type=int, default=5)
    args = parser.parse_args()
    module = load_store_module(args.store_module)
    with tempfile.TemporaryDirectory() as tmp:
        store = lay_out(module, Path(tmp) / "adapters", args.adapters, args.versions)
        forms = {
            "name:alias": AdapterRef("acme", "a3", alias="prod"),
            "name (latest)": AdapterRef("acme", "a3"),
            "name@v3": AdapterRef("acme", "a3", 3),
        }
        for label, ref in forms.items():
            print(f"resolve {label:14s} {per_call_us(store.resolve, ref, args.calls):8.1f} us/call")
        print(f"get     {'name:alias':14s} {per_call_us(store.get, forms['name:alias'], args.calls):8.1f} us/call")
        threaded = per_call_in_thread_us(store.resolve, forms["name:alias"], args.calls // 4)
        print(f"resolve {'name:alias':14s} {threaded:8.1f} us/call via asyncio.to_thread (the cache's lease path)")


if __name__ == "__main__":
    main()
