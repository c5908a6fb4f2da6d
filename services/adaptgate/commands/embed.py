"""`adaptgate embed --input FILE --output FILE.npy`: a large job over one EmbedStream call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adaptgate.client import Client


def read_texts(path: Path) -> list[str]:
    """One text per line; a .jsonl file holds {"text": ...} objects (the dataset format)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [json.loads(line)["text"] for line in lines] if path.suffix == ".jsonl" else lines


def embed_file(client: Client, source: Path, output: Path, chunk_size: int, adapter: str, truncate: bool) -> None:
    """Chunks stream in order with a few in flight (the server's EmbedStream), rows land in input order."""
    texts = read_texts(source)
    chunks = [texts[i : i + chunk_size] for i in range(0, len(texts), chunk_size)]
    parts: list[np.ndarray] = []
    with tqdm(total=len(texts), unit="text", file=sys.stderr, desc="embedding") as bar:
        for array in client.embed_stream(iter(chunks), adapter=adapter, truncate=truncate):
            parts.append(array)
            bar.update(len(array))
    np.save(output, np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32))
    print(f"{len(texts)} embeddings written to {output}", file=sys.stderr)
