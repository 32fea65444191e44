"""Tasks on the embedded corpus (``hfx.data.embedded``): offline, generated from a seed.

The data files are written once to ``$HFX_EMBEDDED_DIR`` (default ``~/.cache/hfx/embedded/seed0``);
the task mappings below point at them with absolute ``data_files``. All carry the tag ``embedded``.

- ``embedded_facts`` / ``embedded_arithmetic``: 4-way multiple choice, a choice continues the
  query after one space; demonstrations come from ``train``, scores from ``test``.
- ``embedded_topics``: 5-way topic classification as multiple choice over the label names.
- ``embedded_corpus_ppl``: rolling perplexity of the validation documents.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hfx.registry import Component


def data_dir() -> Path:
    return Path(os.environ.get("HFX_EMBEDDED_DIR", Path.home() / ".cache" / "hfx" / "embedded" / "seed0"))


def _files() -> dict[str, Path]:
    directory = data_dir()
    marker = directory / "files.json"
    if marker.exists():  # every later task listing: no import of hfx.data (datasets, transformers)
        return {k: Path(v) for k, v in json.loads(marker.read_text()).items()}
    from hfx.data import write_embedded_data

    files = write_embedded_data(directory)
    marker.write_text(json.dumps({k: str(v) for k, v in files.items()}))
    return files


def _splits(files: dict[str, Path], name: str) -> dict:
    return {"data_files": {s: str(files[f"{name}_{s}"]) for s in ("train", "validation", "test")}}


def _multiple_choice(files, name: str) -> dict:
    return {
        "task": f"embedded_{name}",
        "tag": ["embedded"],
        "dataset_path": "json",
        "dataset_kwargs": _splits(files, name),
        "output_type": "multiple_choice",
        "training_split": "train",
        "validation_split": "validation",
        "test_split": "test",
        "fewshot_split": "train",
        "doc_to_text": "{{query}}",
        "doc_to_target": "gold",
        "doc_to_choice": "choices",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        "metadata": {"version": 1.0},
    }


def tasks() -> list[dict]:
    return task_configs(_files())


def task_configs(files: dict[str, Path]) -> list[dict]:
    """The embedded task mappings for data files written by ``hfx.data.write_embedded_data``."""
    labels = [entry["name"] for entry in sorted(json.loads(Path(files["topics_labels"]).read_text()), key=lambda e: e["label"])]
    topics = {
        **_multiple_choice(files, "topics"),
        "task": "embedded_topics",
        "doc_to_text": "{{text}}\ntopic:",
        "doc_to_target": "label",
        "doc_to_choice": labels,
        "metric_list": [{"metric": "acc"}],
    }
    corpus = {
        "task": "embedded_corpus_ppl",
        "tag": ["embedded"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(files["corpus_validation"])}},
        "output_type": "loglikelihood_rolling",
        "validation_split": "validation",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metadata": {"version": 1.0},
    }
    return [_multiple_choice(files, "facts"), _multiple_choice(files, "arithmetic"), topics, corpus]


COMPONENT = Component(
    kind="tasks",
    name="embedded",
    factory=tasks,
    description="Offline tasks on hfx's generated corpus: embedded_facts, embedded_arithmetic, embedded_topics, "
    "embedded_corpus_ppl (tag: embedded).",
)
