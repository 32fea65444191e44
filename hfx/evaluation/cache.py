"""Result cache keyed by model identity and request, so a killed run resumes and a changed model never reuses results.

The identity of a model loaded from a folder is a hash of the *content* of every file that can
change a number: the weights (``*.safetensors``, ``*.bin``, ... and their shard index), ``config.json``,
``generation_config.json`` and the tokenizer files; plus the loaded config, generation config,
dtype, attention implementation, the tokenizer's serialised form and the BOS setting. A model
object without a folder is hashed by its state dict. Size and mtime are never trusted: ``cp -p``
and ``rsync -a`` keep them.

Hashing a 7B checkpoint takes a while, so content hashes are memoised in a small JSON file next to
the results (:data:`MEMO_NAME`, written atomically), keyed by path and by the file's ``st_dev``,
``st_ino``, size, ``st_mtime_ns`` and ``st_ctime_ns``. Any write to a file (``cp -p`` over it
included) moves its ctime, which no user tool can set back, so an unchanged file is hashed once.

Each identity has its own append-only JSON-lines file, ``{identity}.jsonl`` (lines
``{"k": key, "v": value}``); a batch's lines are written and fsynced after every batch, so a run
killed mid-way loses at most one batch. A line that is not a record (cut short by a kill, or valid
JSON of another shape) is skipped on reload, and the next write starts on a fresh line.

Several writer processes. The ranks of a data-parallel run (:mod:`.distributed`) share one
identity; rank ``r`` of a multi-process world appends to its own ``{identity}.rank{r}.jsonl``, and
every reader reads the single-process file and every rank file of the identity. A killed
N-process run thus resumes, with any number of processes, from what each rank had written. One
file per writer is chosen over one shared file with ``flock``: ranks never wait on each other, a
rank killed while holding a lock cannot block the rest, and nothing depends on how a network file
system implements locks or ``O_APPEND``. A key that two files both hold has the same value (a
request's result depends on the model and the request only), so the order they are read in does
not matter. Independent single-process runs of the same model still share ``{identity}.jsonl``:
each batch is one ``write()`` on a file opened with ``O_APPEND``, which a local file system never
interleaves with another process's.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Small files of a saved model that change what it computes or how text is tokenised. Named, not
# matched by suffix: a results file or a note saved into the model folder must not change its identity.
IDENTITY_NAMES = frozenset({
    "config.json", "generation_config.json", "adapter_config.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
})
# Sentencepiece / tiktoken vocabularies, and remote code (``trust_remote_code`` runs it).
IDENTITY_SUFFIXES = (".model", ".tiktoken", ".py")
# What Trainer saves next to a checkpoint's weights: never part of what the model computes.
TRAINER_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "trainer_state.json")
MEMO_NAME = "content-hashes.json"
HASH_CHUNK = 8 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("HFX_EVAL_CACHE", Path.home() / ".cache" / "hfx" / "eval"))


def file_digest(path: str | os.PathLike) -> str:
    """blake2b-128 of a file's bytes, read in chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_key(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class ContentHashMemo:
    """``path -> content hash``, reused while the file's (dev, inode, size, mtime, ctime) are unchanged.

    ``directory=None`` keeps the memo in memory only. The file is rewritten (temp file, then
    ``os.replace``) by :meth:`save` when something new was hashed; a memo that cannot be read or
    written is ignored: it only saves time.
    """

    def __init__(self, directory: str | os.PathLike | None = None, digest: Callable[[str], str] | None = None):
        self.path = Path(directory) / MEMO_NAME if directory is not None else None
        self.digest = digest
        self.hashed = 0  # files read in full by this memo (the rest came from the memo)
        self.entries: dict[str, dict] = {}
        self.changed = False
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                loaded = {}
            if isinstance(loaded, dict):
                self.entries = {k: v for k, v in loaded.items()
                                if isinstance(v, dict) and isinstance(v.get("hash"), str) and isinstance(v.get("stat"), list)}

    def hash(self, path: str | os.PathLike) -> str:
        path = Path(path).resolve()
        stat = path.stat()
        entry = self.entries.get(str(path))
        if entry is not None and entry["stat"] == _stat_key(stat):
            return entry["hash"]
        value = (self.digest or file_digest)(str(path))
        self.hashed += 1
        after = path.stat()
        if _stat_key(after) == _stat_key(stat):  # not written to while it was read
            self.entries[str(path)] = {"stat": _stat_key(stat), "hash": value}
            self.changed = True
        return value

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        live = {k: v for k, v in self.entries.items() if Path(k).exists()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{MEMO_NAME}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(live, handle, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            return
        self.changed = False


def identity_files(path: Path) -> list[Path]:
    """The files of a model folder whose content is part of its identity (sorted by name)."""
    files = []
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name in TRAINER_STATE_FILES or file.name.startswith("rng_state"):
            continue
        if (file.suffix in WEIGHT_SUFFIXES or file.name.endswith(".index.json") or file.name in IDENTITY_NAMES
                or file.suffix in IDENTITY_SUFFIXES):
            files.append(file)
    return files


def _hash_directory(path: Path, digest, memo: ContentHashMemo) -> None:
    for file in identity_files(path):
        digest.update(f"{file.name}:{memo.hash(file)}\n".encode())
    adapter = path / "adapter_config.json"
    if adapter.is_file():  # a PEFT adapter: its base model's files are part of what it computes
        try:
            base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            base = None
        if isinstance(base, str) and base and Path(base).is_dir() and Path(base).resolve() != path.resolve():
            digest.update(b"base:")
            _hash_directory(Path(base), digest, memo)


def _config_dict(config) -> dict:
    data = config.to_dict()
    data.pop("_name_or_path", None)  # where it was loaded from is not what it computes
    return data


def model_identity(
    model,
    tokenizer=None,
    source: str | os.PathLike | None = None,
    *,
    memo: ContentHashMemo | None = None,
    add_bos_token: bool | None = None,
    bnb_cpu_path: str | None = None,
) -> str:
    """A hex digest that changes whenever anything that can change a score changes.

    ``source``: the folder the model was loaded from (its files are hashed by content, through
    ``memo``); without one, the model's state dict is hashed. ``add_bos_token`` is the BOS
    setting the scorer tokenises with; ``bnb_cpu_path`` the bitsandbytes 4-bit CPU kernel
    (``hfx.quantization``: the fused bf16 and the dequantising kernels give different numbers).
    """
    digest = hashlib.blake2b(digest_size=16)
    if source is not None and Path(source).is_dir():
        _hash_directory(Path(source), digest, memo if memo is not None else ContentHashMemo())
    else:
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    digest.update(json.dumps(_config_dict(model.config), sort_keys=True, default=str).encode())
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        digest.update(json.dumps(generation_config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(next(model.parameters()).dtype).encode())
    digest.update(str(getattr(model.config, "_attn_implementation", None)).encode())
    digest.update(f"add_bos_token={add_bos_token}".encode())
    digest.update(f"bnb_cpu_path={bnb_cpu_path}".encode())
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
        digest.update(repr(tokenizer.all_special_tokens).encode())
        digest.update(repr((getattr(tokenizer, "model_max_length", None), getattr(tokenizer, "add_bos_token", None),
                            getattr(tokenizer, "add_eos_token", None))).encode())
    return digest.hexdigest()


def _byte_dtype():
    import torch

    return torch.uint8


def request_key(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


class ResultCache:
    """An append-only key → JSON value store for one model identity, readable and writable by several processes.

    ``rank``: the writer's rank in a multi-process world (``None``: a single process), which picks
    the file this process appends to; every writer's file is read. :meth:`use_rank` switches it later.
    """

    def __init__(self, directory: str | os.PathLike, identity: str, *, rank: int | None = None):
        self.directory = Path(directory)
        self.identity = identity
        self.directory.mkdir(parents=True, exist_ok=True)
        self.values: dict[str, Any] = {}
        self.hits = 0
        self.use_rank(rank)
        for path in self.files():
            self._read(path)

    def use_rank(self, rank: int | None) -> None:
        """Append from now on to rank ``rank``'s file (``None``: the single-process file)."""
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise ValueError(f"rank must be an integer >= 0 or None, got {rank!r}")
        self.rank = rank
        name = f"{self.identity}.jsonl" if rank is None else f"{self.identity}.rank{rank}.jsonl"
        self.path = self.directory / name
        self._fresh_line: bool | None = None  # whether the file ends on a line break; checked at first write

    def files(self) -> list[Path]:
        """Every file of this identity: the single-process one, then each rank's, by rank."""
        ranked = []
        for path in self.directory.glob(f"{self.identity}.rank*.jsonl"):
            number = path.name[len(self.identity) + len(".rank"):-len(".jsonl")]
            if number.isdigit():
                ranked.append((int(number), path))
        base = self.directory / f"{self.identity}.jsonl"
        return ([base] if base.is_file() else []) + [p for _, p in sorted(ranked)]

    def _read(self, path: Path) -> None:
        try:
            handle = open(path, encoding="utf-8", errors="replace")
        except OSError:
            return
        with handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed run (or one another writer is writing now)
                if isinstance(record, dict) and isinstance(record.get("k"), str) and "v" in record:
                    self.values[record["k"]] = record["v"]  # anything else is not a record: skipped

    def get(self, key: str) -> Any:
        value = self.values.get(key)
        if value is not None:
            self.hits += 1
        return value

    def remember(self, items: dict[str, Any]) -> None:
        """Known values another process wrote to its own file: kept in memory, not written again."""
        self.values.update(items)

    def put_many(self, items: dict[str, Any]) -> None:
        if not items:
            return
        self.values.update(items)
        data = "".join(json.dumps({"k": k, "v": v}) + "\n" for k, v in items.items()).encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if self._fresh_line is None:
                size = os.fstat(fd).st_size
                self._fresh_line = size == 0 or os.pread(fd, 1, size - 1) == b"\n"
            if not self._fresh_line:  # a kill cut the last line short: do not glue the first record to it
                data = b"\n" + data
            view = memoryview(data)
            while view:  # one write() in practice; a partial write (full disk, signal) is finished, not lost
                view = view[os.write(fd, view):]
            os.fsync(fd)
            self._fresh_line = True
        finally:
            os.close(fd)
