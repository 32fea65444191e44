"""Cheap checks that a saved checkpoint folder can be loaded, run before any weights are read.

``check_model_dir`` reads ``config.json`` and the *headers* of the weight files (safetensors
headers, the zip directory of ``.bin`` files), so a missing folder, a folder that is not a model,
or a truncated ``model.safetensors`` is reported in one line in milliseconds, not as a traceback
from deep inside ``from_pretrained`` after the rest of the work has started.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

SAFETENSORS_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")
PICKLE_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (missing, not a model, damaged weights)."""


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name`` with no path syntax: something the hub could resolve."""
    if not name or name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.endswith("/"):
        return False
    return name.count("/") <= 1 and all(part and part not in (".", "..") for part in name.split("/"))


def hub_is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_model_dir(path: str | os.PathLike, what: str = "--model", need_weights: bool = True) -> Path | None:
    """Check that ``path`` is a loadable checkpoint folder; return it, or None for a hub id left to transformers.

    Raises :class:`CheckpointError` naming the path and what is wrong with it.
    """
    name = str(path)
    folder = Path(name).expanduser()
    if not folder.exists():
        if looks_like_hub_id(name) and not hub_is_offline():
            return None
        hint = " (hub access is off: HF_HUB_OFFLINE is set)" if looks_like_hub_id(name) else ""
        raise CheckpointError(f"{what} {name}: no such folder{hint}.")
    if not folder.is_dir():
        raise CheckpointError(f"{what} {name} is a file; give the folder a model was saved to (config.json + weights).")
    config = folder / "config.json"
    if not config.is_file():
        adapter = folder / "adapter_config.json"
        if adapter.is_file():
            try:
                base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                base = None
            raise CheckpointError(
                f"{what} {name} is a PEFT adapter, not a model (it has adapter_config.json and no config.json); "
                f"give its base model{f' ({base})' if base else ''}, or a merged checkpoint."
            )
        raise CheckpointError(f"{what} {name} holds no config.json, so it is not a saved model folder.")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{what} {name}: config.json is not valid JSON ({exc}).") from None
    if need_weights:
        problem = weights_problem(folder)
        if problem:
            raise CheckpointError(f"{what} {name}: {problem}.")
    return folder


def is_seq2seq_checkpoint(config) -> bool:
    """Whether ``AutoModelForSeq2SeqLM`` can build a model from ``config``: an encoder-decoder config whose
    type its registry holds (model types registered at run time included) or whose ``auto_map`` names it."""
    from transformers import AutoModelForSeq2SeqLM

    if not getattr(config, "is_encoder_decoder", False):
        return False
    auto_map = getattr(config, "auto_map", None) or {}
    return type(config) in AutoModelForSeq2SeqLM._model_mapping or "AutoModelForSeq2SeqLM" in auto_map


def weights_problem(folder: Path, names: tuple[str, ...] = SAFETENSORS_WEIGHTS + PICKLE_WEIGHTS) -> str | None:
    """Why the weights in ``folder`` cannot be read, or None when a complete set is there."""
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
                return f"{index_name} is not a valid weight index"
            for shard in shards:
                problem = file_problem(folder / shard)
                if problem:
                    return problem
            return None
    present = [folder / n for n in names if (folder / n).is_file()]
    if not present:
        return f"no weights file ({', '.join(names)} or a sharded index)"
    for weights in present:
        problem = file_problem(weights)
        if problem:
            return problem
    return None


def file_problem(path: Path) -> str | None:
    """Why ``path`` (a safetensors file or a torch zip archive) cannot be read, or None. Reads headers only."""
    if not path.is_file():
        return f"{path.name} is missing"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as exc:
            return f"{path.name} is damaged or truncated ({exc})"
        return None
    if path.suffix in (".bin", ".pt", ".pth"):
        if path.stat().st_size == 0:
            return f"{path.name} is empty"
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as archive:
                    archive.infolist()
            except (zipfile.BadZipFile, OSError) as exc:
                return f"{path.name} is damaged or truncated ({exc})"
            return None
        with open(path, "rb") as handle:
            head = handle.read(2)
        if head[:1] == b"\x80":  # a legacy (non-zip) pickle: nothing cheap to verify beyond its start
            return None
        return f"{path.name} is damaged or truncated (not a torch archive)"
    return None
