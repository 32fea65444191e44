"""The embedded corpus and tasks: deterministic, self-consistent, loadable with datasets."""

import json
from collections import Counter

import pytest
from datasets import load_dataset

from hfx.data import embedded_corpus, write_embedded_data
from hfx.data.embedded import RELATIONS, SPLITS, TOPIC_LABELS


@pytest.fixture(scope="module")
def data():
    return embedded_corpus()


def test_same_seed_same_data_other_seed_other_data(data):
    assert embedded_corpus(seed=0) == data
    assert embedded_corpus(seed=1)["corpus_train"] != data["corpus_train"]


def test_documents_have_at_least_two_sentences_and_text_matches(data):
    for doc in data["corpus_train"] + data["corpus_validation"]:
        assert len(doc["sentences"]) >= 2
        assert doc["text"] == " ".join(doc["sentences"])
    kinds = Counter(doc["kind"] for doc in data["corpus_train"])
    assert set(kinds) == {"entity", "arithmetic"}


@pytest.mark.parametrize("task", ["facts", "arithmetic"])
def test_multiple_choice_items_ask_about_corpus_facts(data, task):
    sentences = {s for doc in data["corpus_train"] for s in doc["sentences"]}
    ids = set()
    for split in SPLITS:
        rows = data[f"{task}_{split}"]
        assert rows, f"{task}_{split} is empty"
        for row in rows:
            assert row["task"] == task
            assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
            assert row["choices"][row["gold"]] == row["answer"]
            assert f"{row['query']} {row['answer']}." in sentences
            assert row["mask_query"] == f"{row['query']} [MASK]."
            ids.add(row["id"])
    assert len(ids) == sum(len(data[f"{task}_{s}"]) for s in SPLITS), "an item appears in two splits"


def test_fact_values_are_balanced_so_frequency_alone_is_at_chance(data):
    rows = [r for s in SPLITS for r in data[f"facts_{s}"]]
    for relation in RELATIONS:
        answers = Counter(r["answer"] for r in rows if r["relation"] == relation)
        assert max(answers.values()) - min(answers.values()) <= 1, (relation, answers)
    golds = Counter(r["gold"] for r in rows)
    assert min(golds.values()) > len(rows) / 4 * 0.6


def test_arithmetic_choices_have_equal_length(data):
    for row in data["arithmetic_test"]:
        assert len({len(c) for c in row["choices"]}) == 1


def test_topics_are_labelled_with_descriptions_and_unseen_entities(data):
    assert len(TOPIC_LABELS) >= 4
    labels = data["topics_labels"]
    assert [entry["label"] for entry in labels] == list(range(len(labels)))
    assert all(entry["description"] for entry in labels)
    corpus_words = {w for doc in data["corpus_train"] for w in doc["text"].replace(".", "").split()}
    for split in SPLITS:
        counts = Counter(row["label"] for row in data[f"topics_{split}"])
        assert len(set(counts.values())) == 1 and len(counts) == len(labels)
        for row in data[f"topics_{split}"]:
            assert labels[row["label"]]["name"] == row["label_name"]
    entity_rows = [r for r in data["topics_test"] if r["label_name"] != "arithmetic"]
    unseen = sum(any(w not in corpus_words for w in r["text"].replace(".", "").split()) for r in entity_rows)
    assert unseen == len(entity_rows)


def test_written_files_load_with_datasets(tmp_path, data):
    paths = write_embedded_data(tmp_path)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"
    for name, path in paths.items():
        if name == "topics_labels":
            assert json.loads(path.read_text()) == data["topics_labels"]
        elif name == "corpus_text":
            documents = path.read_text().strip().split("\n\n")
            assert documents[0].split("\n") == data["corpus_train"][0]["sentences"]
            assert len(documents) == len(data["corpus_train"])
        else:
            loaded = load_dataset("json", data_files=str(path), split="train")
            assert loaded.to_list() == data[name], name


def test_too_few_entities_is_an_error():
    with pytest.raises(ValueError, match="num_entities"):
        embedded_corpus(num_entities=3)
