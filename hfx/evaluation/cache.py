"""Result cache keyed by model identity and request, so a killed run resumes and a changed model never reuses results.

The identity of a model is a hash of either its weights (a model object) or of its directory
(absolute path, name/size/mtime of every weight file, and ``config.json``), plus the tokenizer's
serialised form and the dtype. Each identity has its own append-only JSON-lines file; a line is
written and flushed after every batch, so a run killed mid-way loses at most one batch, and a
half-written last line is ignored on reload.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def default_cache_dir() -> Path:
    return Path(os.environ.get("HFX_EVAL_CACHE", Path.home() / ".cache" / "hfx" / "eval"))


def _hash_directory(path: Path, digest) -> None:
    digest.update(str(path.resolve()).encode())
    for file in sorted(path.iterdir()):
        if file.suffix in WEIGHT_SUFFIXES or file.name.endswith(".index.json"):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    config = path / "config.json"
    if config.exists():
        digest.update(config.read_bytes())


def model_identity(model, tokenizer=None, source: str | os.PathLike | None = None) -> str:
    """A hex digest that changes whenever the weights, the config or the tokenizer change."""
    digest = hashlib.blake2b(digest_size=16)
    if source is not None and Path(source).is_dir():
        _hash_directory(Path(source), digest)
    else:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(next(model.parameters()).dtype).encode())
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        digest.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
        digest.update(repr(tokenizer.all_special_tokens).encode())
    return digest.hexdigest()


def _byte_dtype():
    import torch

    return torch.uint8


def request_key(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


class ResultCache:
    """An append-only key → JSON value store for one model identity."""

    def __init__(self, directory: str | os.PathLike, identity: str):
        self.path = Path(directory) / f"{identity}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.values: dict[str, Any] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a killed run
                    self.values[record["k"]] = record["v"]
        self.hits = 0

    def get(self, key: str) -> Any:
        value = self.values.get(key)
        if value is not None:
            self.hits += 1
        return value

    def put_many(self, items: dict[str, Any]) -> None:
        if not items:
            return
        self.values.update(items)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps({"k": k, "v": v}) + "\n" for k, v in items.items()))
            handle.flush()
            os.fsync(handle.fileno())
