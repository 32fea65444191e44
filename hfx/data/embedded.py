"""The embedded default corpus and evaluation tasks: text hfx generates itself, no download.

Everything here is produced by a seeded ``random.Random``; the same seed gives byte-identical
files on every machine. No third-party text is used: entities are invented pseudo-words, the
sentences come from a handful of templates written for this project.

What the world contains
-----------------------
``num_entities`` invented people (e.g. ``"dovakel"``). Each has five facts, one per relation:

============  ==================================  =================================
relation      canonical sentence                  values
============  ==================================  =================================
``city``      ``dovakel lives in varnhold.``      invented town names
``color``     ``dovakel likes the color blue.``   colour words
``job``       ``dovakel works as a baker.``       occupations
``pet``       ``dovakel has a pet goat.``         animals
``friend``    ``dovakel is a friend of mirasu.``  another entity
============  ==================================  =================================

Values are dealt round-robin, so every value is equally frequent: a model that learned only
which words follow "lives in" is at chance on the tasks; only entity-specific facts help.
Besides the canonical sentence each relation has a paraphrase (``"the home of dovakel is
varnhold."``). Arithmetic documents state single-digit sums and differences
(``"3 plus 4 is 7."``, ``"7 minus 4 is 3."``).

Documents (lists of sentences) are: ``docs_per_entity`` documents per entity, each stating
all five of its facts in a shuffled order with a random template, and arithmetic documents of
4-8 equations. Every document has at least two sentences, so NSP pairs can be built from any
of them.

API
---
``embedded_corpus(seed=0, ...) -> dict[str, list[dict]]``
    In-memory records of every file below, keyed by the same names.
``write_embedded_data(directory, seed=0, ...) -> dict[str, Path]``
    Writes the files (atomically) and returns their paths, keyed by name.
``load_embedded(name, directory=None, seed=0) -> datasets.Dataset``
    One file as a ``datasets.Dataset`` (writes to a temporary directory when none is given).

Files (stable names and fields; other tools build on them)
----------------------------------------------------------
``corpus_train.jsonl`` / ``corpus_validation.jsonl`` (keys ``corpus_train``, ``corpus_validation``)
    ``{"id": str, "kind": "entity"|"arithmetic", "sentences": [str, ...], "text": str}``;
    ``text`` is the sentences joined by one space. Validation documents restate the same facts
    with a fresh shuffle (it measures fitting of the corpus, not generalisation).
``corpus.txt`` (key ``corpus_text``)
    The training documents in BERT's raw format: one sentence per line, a blank line between
    documents. ``hfx.data.load_text_documents`` reads it back.
``facts_{split}.jsonl`` (keys ``facts_train``, ``facts_validation``, ``facts_test``)
    Multiple choice over entity facts:
    ``{"id", "task": "facts", "relation", "query": "dovakel lives in", "choices": [4 str],
    "gold": int, "answer": str, "mask_query": "dovakel lives in [MASK]."}``.
    A choice continues ``query`` after one space; ``query + " " + answer + "."`` is a corpus
    sentence. ``mask_query`` is the cloze form for masked-LM scoring. Chance is 25%.
``arithmetic_{split}.jsonl`` (keys ``arithmetic_train``, ...)
    Same fields, ``task: "arithmetic"``, ``relation: "plus"|"minus"``, ``query: "3 plus 4 is"``;
    distractors lie within 4 of the answer and have the same number of digits.
``topics_{split}.jsonl`` (keys ``topics_train``, ...)
    Sentence classification: ``{"id", "text", "label": int, "label_name": str}``, five
    classes, balanced. Texts are about *new* entities (not in the corpus), so the label
    depends on what the sentence talks about, not on memorised facts. For n-way k-shot
    episodes draw the support set from ``train`` and queries from ``test``.
``topics_labels.json`` (key ``topics_labels``)
    ``[{"label": int, "name": str, "description": str}, ...]``: label names and one-sentence
    descriptions for zero-shot classification.

Splits of the multiple-choice tasks partition the *questions* (by entity, and by equation);
every fact they ask about is stated in ``corpus_train``. ``train`` is the pool for few-shot
demonstrations, ``test`` the one to report. The tasks measure whether pre-training on the
corpus stored its facts: an untrained model scores about 25%.

All jsonl files load with ``datasets.load_dataset("json", data_files=path, split="train")``.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

DEFAULT_SEED = 0
DEFAULT_NUM_ENTITIES = 32
DEFAULT_DOCS_PER_ENTITY = 16
DEFAULT_NUM_ARITHMETIC_DOCS = 160
SPLITS = ("train", "validation", "test")
# Fraction of task questions in train / validation; the rest is test.
SPLIT_FRACTIONS = (0.2, 0.2)
NUM_CHOICES = 4

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "", "n", "l", "r", "s", "k"]

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
JOBS = ["baker", "farmer", "painter", "doctor", "sailor", "teacher", "miner", "weaver"]
PETS = ["cat", "dog", "horse", "goat", "owl", "fox", "rabbit", "parrot"]
NUM_CITIES = 8

# relation -> (canonical template, paraphrase template, cloze prefix); {e} entity, {v} value.
RELATIONS = {
    "city": ("{e} lives in {v}.", "the home of {e} is {v}.", "{e} lives in"),
    "color": ("{e} likes the color {v}.", "the favourite color of {e} is {v}.", "{e} likes the color"),
    "job": ("{e} works as a {v}.", "by trade {e} is a {v}.", "{e} works as a"),
    "pet": ("{e} has a pet {v}.", "the pet of {e} is a {v}.", "{e} has a pet"),
    "friend": ("{e} is a friend of {v}.", "the best friend of {e} is {v}.", "{e} is a friend of"),
}
# Probability that a fact is stated with its canonical template in a training document.
CANONICAL_RATE = 0.7

TOPIC_LABELS = [
    ("home", "where someone lives: a town or place of residence."),
    ("color", "a colour that someone likes."),
    ("occupation", "someone's job or trade."),
    ("animal", "an animal or pet that someone keeps."),
    ("arithmetic", "a sum or difference of numbers."),
]
_TOPIC_TEMPLATES = {
    "home": ["{e} lives in {city}.", "the home of {e} is {city}.", "{e} moved to {city} last year.",
             "{e} grew up in {city}."],
    "color": ["{e} likes the color {color}.", "the favourite color of {e} is {color}.",
              "{e} painted the door {color}.", "{e} always wears {color}."],
    "occupation": ["{e} works as a {job}.", "by trade {e} is a {job}.", "{e} trained to be a {job}.",
                   "{e} earns a living as a {job}."],
    "animal": ["{e} has a pet {pet}.", "the pet of {e} is a {pet}.", "{e} feeds the {pet} every morning.",
               "{e} found a lost {pet}."],
    "arithmetic": ["{a} plus {b} is {s}.", "{s} minus {b} is {a}.", "adding {a} and {b} gives {s}.",
                   "take {b} from {s} and {a} is left."],
}
TOPIC_EXAMPLES_PER_LABEL = {"train": 16, "validation": 16, "test": 40}


def _pseudo_words(rng: random.Random, count: int, exclude: set[str]) -> list[str]:
    words: list[str] = []
    seen = set(exclude)
    while len(words) < count:
        syllables = rng.choice([2, 2, 3])
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
        if word not in seen and 5 <= len(word) <= 10:
            seen.add(word)
            words.append(word)
    return words


def _world(rng: random.Random, num_entities: int) -> tuple[list[str], list[str], dict[str, dict[str, str]]]:
    names = _pseudo_words(rng, num_entities, set())
    cities = _pseudo_words(rng, NUM_CITIES, set(names))
    values = {"city": cities, "color": COLORS, "job": JOBS, "pet": PETS}
    facts: dict[str, dict[str, str]] = {name: {} for name in names}
    for relation, pool in values.items():
        dealt = [pool[i % len(pool)] for i in range(num_entities)]
        rng.shuffle(dealt)
        for name, value in zip(names, dealt, strict=True):
            facts[name][relation] = value
    # Friends: a random derangement, so nobody is their own friend and every name is a friend once.
    order = names[:]
    rng.shuffle(order)
    for i, name in enumerate(order):
        facts[name]["friend"] = order[(i + 1) % len(order)]
    return names, cities, facts


def _value_pool(relation: str, names: list[str], cities: list[str]) -> list[str]:
    return {"city": cities, "color": COLORS, "job": JOBS, "pet": PETS, "friend": names}[relation]


def _fact_sentence(rng: random.Random, entity: str, relation: str, value: str, canonical_rate: float) -> str:
    canonical, paraphrase, _ = RELATIONS[relation]
    template = canonical if rng.random() < canonical_rate else paraphrase
    return template.format(e=entity, v=value)


def _equations() -> list[tuple[str, int, int, int]]:
    """Every single-digit sum a + b (a, b in 0..9) and its inverse difference."""
    out = []
    for a in range(10):
        for b in range(10):
            out.append(("plus", a, b, a + b))
            out.append(("minus", a + b, b, a))
    return out


def _equation_sentence(op: str, x: int, y: int, z: int) -> str:
    return f"{x} {op} {y} is {z}."


def _documents(rng, names, facts, docs_per_entity, num_arithmetic_docs, prefix, canonical_rate):
    docs = []
    for _ in range(docs_per_entity):
        for name in names:
            relations = list(RELATIONS)
            rng.shuffle(relations)
            sentences = [_fact_sentence(rng, name, r, facts[name][r], canonical_rate) for r in relations]
            docs.append({"kind": "entity", "sentences": sentences})
    # Equations are dealt from repeatedly shuffled decks, so every one is stated (about equally often).
    deck: list = []
    for _ in range(num_arithmetic_docs):
        size = rng.randint(4, 8)
        while len(deck) < size:
            fresh = _equations()
            rng.shuffle(fresh)
            deck.extend(fresh)
        sentences = [_equation_sentence(*eq) for eq in deck[:size]]
        del deck[:size]
        docs.append({"kind": "arithmetic", "sentences": sentences})
    rng.shuffle(docs)
    return [
        {"id": f"{prefix}-{i}", "kind": d["kind"], "sentences": d["sentences"], "text": " ".join(d["sentences"])}
        for i, d in enumerate(docs)
    ]


def _split_of(index: int, total: int) -> str:
    train_end = round(total * SPLIT_FRACTIONS[0])
    validation_end = train_end + round(total * SPLIT_FRACTIONS[1])
    return "train" if index < train_end else "validation" if index < validation_end else "test"


def _mc_item(rng, item_id, task, relation, query, answer, pool, mask_query):
    distractors = rng.sample([v for v in pool if v != answer], NUM_CHOICES - 1)
    gold = rng.randrange(NUM_CHOICES)
    choices = distractors[:gold] + [answer] + distractors[gold:]
    return {
        "id": item_id,
        "task": task,
        "relation": relation,
        "query": query,
        "choices": choices,
        "gold": gold,
        "answer": answer,
        "mask_query": mask_query,
    }


def _fact_tasks(rng, names, cities, facts):
    split_names = names[:]
    rng.shuffle(split_names)
    out = {split: [] for split in SPLITS}
    for index, name in enumerate(split_names):
        split = _split_of(index, len(split_names))
        for relation, (_, _, cloze) in RELATIONS.items():
            query = cloze.format(e=name)
            pool = [v for v in _value_pool(relation, names, cities) if v != name]
            item = _mc_item(rng, f"facts-{name}-{relation}", "facts", relation, query, facts[name][relation], pool,
                            f"{query} [MASK].")
            out[split].append(item)
    return out


def _arithmetic_tasks(rng):
    equations = [eq for eq in _equations() if eq[0] == "plus"] + [eq for eq in _equations() if eq[0] == "minus"]
    rng.shuffle(equations)
    out = {split: [] for split in SPLITS}
    for index, (op, x, y, z) in enumerate(equations):
        query = f"{x} {op} {y} is"
        # Distractors lie near the answer and have as many digits (so as many tokens): a summed
        # log-likelihood cannot prefer a choice for being shorter.
        low, high = (0, 9) if z < 10 else (10, 18)
        pool = [str(n) for n in range(max(low, z - 4), min(high, z + 4) + 1)]
        item = _mc_item(rng, f"arithmetic-{x}-{op}-{y}", "arithmetic", op, query, str(z), pool, f"{query} [MASK].")
        out[_split_of(index, len(equations))].append(item)
    return out


def _topic_tasks(rng, exclude):
    new_names = _pseudo_words(rng, 200, exclude)
    cities = _pseudo_words(rng, NUM_CITIES, exclude | set(new_names))
    out = {}
    for split in SPLITS:
        rows = []
        for label, (label_name, _) in enumerate(TOPIC_LABELS):
            for _ in range(TOPIC_EXAMPLES_PER_LABEL[split]):
                a, b = rng.randrange(10), rng.randrange(10)
                text = rng.choice(_TOPIC_TEMPLATES[label_name]).format(
                    e=rng.choice(new_names), city=rng.choice(cities), color=rng.choice(COLORS),
                    job=rng.choice(JOBS), pet=rng.choice(PETS), a=a, b=b, s=a + b,
                )
                rows.append({"text": text, "label": label, "label_name": label_name})
        rng.shuffle(rows)
        out[split] = [{"id": f"topics-{split}-{i}", **row} for i, row in enumerate(rows)]
    return out


def embedded_corpus(
    seed: int = DEFAULT_SEED,
    num_entities: int = DEFAULT_NUM_ENTITIES,
    docs_per_entity: int = DEFAULT_DOCS_PER_ENTITY,
    num_arithmetic_docs: int = DEFAULT_NUM_ARITHMETIC_DOCS,
) -> dict[str, list]:
    """Every embedded dataset as in-memory records, keyed like the files (see the module docstring)."""
    if num_entities < 2 * NUM_CHOICES:
        raise ValueError(f"num_entities must be at least {2 * NUM_CHOICES} to build 4-way choices, got {num_entities}.")
    rng = random.Random(seed)
    names, cities, facts = _world(rng, num_entities)
    data: dict[str, list] = {
        "corpus_train": _documents(rng, names, facts, docs_per_entity, num_arithmetic_docs, "train", CANONICAL_RATE),
        "corpus_validation": _documents(
            rng, names, facts, max(1, docs_per_entity // 8), max(1, num_arithmetic_docs // 8), "validation",
            CANONICAL_RATE,
        ),
    }
    for task, splits in (("facts", _fact_tasks(rng, names, cities, facts)), ("arithmetic", _arithmetic_tasks(rng))):
        for split, rows in splits.items():
            data[f"{task}_{split}"] = rows
    for split, rows in _topic_tasks(rng, set(names) | set(cities)).items():
        data[f"topics_{split}"] = rows
    data["topics_labels"] = [
        {"label": i, "name": name, "description": description} for i, (name, description) in enumerate(TOPIC_LABELS)
    ]
    return data


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_embedded_data(directory: str | os.PathLike, seed: int = DEFAULT_SEED, **sizes) -> dict[str, Path]:
    """Write every embedded file into ``directory``; returns ``{name: path}`` (names as in the module docstring)."""
    directory = Path(directory)
    data = embedded_corpus(seed=seed, **sizes)
    paths: dict[str, Path] = {}
    for name, rows in data.items():
        if name == "topics_labels":
            path = directory / "topics_labels.json"
            _atomic_write(path, json.dumps(rows, indent=2) + "\n")
        else:
            path = directory / f"{name}.jsonl"
            _atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))
        paths[name] = path
    text_path = directory / "corpus.txt"
    _atomic_write(text_path, "\n\n".join("\n".join(doc["sentences"]) for doc in data["corpus_train"]) + "\n")
    paths["corpus_text"] = text_path
    return paths


def load_embedded(name: str, directory: str | os.PathLike | None = None, seed: int = DEFAULT_SEED):
    """One embedded file as a ``datasets.Dataset`` (``name`` as in the module docstring, e.g. ``"facts_test"``)."""
    from datasets import load_dataset

    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="hfx-embedded-"))
    paths = write_embedded_data(directory, seed=seed)
    if name not in paths or name in ("topics_labels", "corpus_text"):
        valid = sorted(n for n in paths if n not in ("topics_labels", "corpus_text"))
        raise ValueError(f"unknown embedded dataset {name!r}; valid names: {valid}.")
    return load_dataset("json", data_files=str(paths[name]), split="train")


__all__ = ["embedded_corpus", "load_embedded", "write_embedded_data", "RELATIONS", "TOPIC_LABELS"]
