"""Encoder tasks on the embedded topic data (``hfx.data.embedded``), offline; tag ``embedded_encoder``.

- ``embedded_topics_5way5shot``: ``n_way_k_shot``, 5 classes, 5 support examples each from
  ``train``, 10 queries each from ``test``, 100 episodes, mean pooling, cosine prototypes.
- ``embedded_topics_zeroshot``: ``zero_shot_classification`` by label descriptions (the
  one-sentence descriptions shipped in ``topics_labels.json``), embedded like the inputs.
- ``embedded_topics_cloze``: ``zero_shot_classification`` by a masked LM filling
  ``"{text} it is about {mask}."`` with one corpus word per class.

The files are written once to ``$HFX_EMBEDDED_DIR`` (default ``~/.cache/hfx/embedded/seed0``),
the directory the in-context ``embedded`` tasks use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hfx.registry import Component

CLOZE_VERBALIZERS = {"home": "lives", "color": "color", "occupation": "works", "animal": "pet", "arithmetic": "plus"}


def _topic_files(directory: Path) -> dict[str, str]:
    names = ("topics_train", "topics_test", "topics_labels")
    paths = {name: directory / f"{name}.{'json' if name == 'topics_labels' else 'jsonl'}" for name in names}
    if not all(path.exists() for path in paths.values()):
        from hfx.data import write_embedded_data  # datasets + transformers: only to write the files once

        written = write_embedded_data(directory)
        paths = {name: written[name] for name in names}
    return {name: str(path) for name, path in paths.items()}


def tasks(directory: str | os.PathLike | None = None) -> list[dict]:
    """The task mappings, on the embedded files in ``directory`` (written there if missing)."""
    default = Path(os.environ.get("HFX_EMBEDDED_DIR", Path.home() / ".cache" / "hfx" / "embedded" / "seed0"))
    files = _topic_files(Path(directory) if directory is not None else default)
    descriptions = {entry["name"]: entry["description"] for entry in json.loads(Path(files["topics_labels"]).read_text())}
    common = {
        "tag": ["embedded_encoder"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": files["topics_train"], "test": files["topics_test"]}},
        "training_split": "train",
        "test_split": "test",
        "doc_to_text": "text",
        "doc_to_target": "label_name",
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    few_shot = {
        **common,
        "task": "embedded_topics_5way5shot",
        "output_type": "n_way_k_shot",
        "fewshot_split": "train",
        "n_way": 5, "k_shot": 5, "n_query": 10, "episodes": 100, "seed": 1234,
        "pooling": "mean", "distance": "cosine",
    }
    zero_shot = {
        **common,
        "task": "embedded_topics_zeroshot",
        "output_type": "zero_shot_classification",
        "method": "description",
        "label_descriptions": descriptions,
        "pooling": "mean", "distance": "cosine",
    }
    cloze = {
        **common,
        "task": "embedded_topics_cloze",
        "output_type": "zero_shot_classification",
        "method": "cloze",
        "template": "{text} it is about {mask}.",
        "verbalizers": CLOZE_VERBALIZERS,
    }
    return [few_shot, zero_shot, cloze]


COMPONENT = Component(
    kind="tasks",
    name="encoder",
    factory=tasks,
    description="Offline encoder tasks on the embedded topics: embedded_topics_5way5shot (n-way k-shot), "
    "embedded_topics_zeroshot (label descriptions), embedded_topics_cloze (masked LM) (tag: embedded_encoder).",
)
