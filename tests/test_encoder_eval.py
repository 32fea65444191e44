"""Encoder evaluators: episodes, prototypes, the three zero-shot methods and their input checks."""

import json

import numpy as np
import pytest
import torch
from datasets import load_dataset
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

import hfx
from hfx.evaluation.encoder import (
    classify,
    cloze_scores,
    embed_texts,
    n_way_k_shot,
    nli_scores,
    sample_episodes,
    zero_shot,
)
from hfx.tokenizer import train_tokenizer

CLASS_WORDS = {  # every text of a class is made of its own words only: separable by construction
    "red": ["apple", "cherry", "ruby", "brick"],
    "green": ["grass", "leaf", "frog", "lime"],
    "blue": ["sky", "sea", "ocean", "sapphire"],
    "gold": ["coin", "crown", "sun", "honey"],
}


def synthetic_rows(per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for label, words in CLASS_WORDS.items():
        for _ in range(per_class):
            rows.append({"text": " ".join(rng.choice(words, size=5)), "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("encoder_eval")


@pytest.fixture(scope="module")
def tokenizer_dir(workdir):
    words = [w for ws in CLASS_WORDS.values() for w in ws] + ["it", "is", "about", "this", "example", "colour", "."]
    tok = train_tokenizer([" ".join(words)] * 4 + ["strawberry raspberry blueberry"], vocab_size=200)
    path = workdir / "tok"
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tiny(tokenizer, **overrides):
    base = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    base.update(overrides)
    return hfx.HfxConfig(**base)


@pytest.fixture(scope="module")
def mlm(tokenizer, workdir):
    torch.manual_seed(0)
    path = workdir / "mlm"
    hfx.HfxForMaskedLM(tiny(tokenizer)).save_pretrained(str(path))
    return AutoModelForMaskedLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def data(workdir):
    return load_dataset("json", data_files=write_jsonl(workdir / "synthetic.jsonl", synthetic_rows()), split="train")


class OneHotEncoder(torch.nn.Module):
    """Last hidden state = a bag-of-words one-hot: texts of different classes share no dimension."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = hfx.HfxConfig(vocab_size=vocab_size, hidden_size=vocab_size, num_hidden_layers=1,
                                    num_attention_heads=1, intermediate_size=4)
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, **_):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=torch.nn.functional.one_hot(input_ids, self.config.vocab_size).float())


# -- episodes ---------------------------------------------------------------------------------
def test_episodes_reproducible_disjoint_and_prefix_stable():
    labels = [r["label"] for r in synthetic_rows()]
    a = sample_episodes(labels, 3, 2, 4, 20, seed=7)
    b = sample_episodes(labels, 3, 2, 4, 20, seed=7)
    c = sample_episodes(labels, 3, 2, 4, 20, seed=8)
    assert all(np.array_equal(x.support, y.support) and np.array_equal(x.query, y.query) for x, y in zip(a, b))
    assert any(not np.array_equal(x.query, y.query) for x, y in zip(a, c))
    first = sample_episodes(labels, 3, 2, 4, 5, seed=7)
    assert all(np.array_equal(x.query, y.query) for x, y in zip(first, a[:5]))
    for episode in a:
        assert episode.support.shape == (3, 2) and episode.query.shape == (3, 4)
        assert not set(episode.support.ravel()) & set(episode.query.ravel())
        for j, cls in enumerate(episode.classes):
            assert {labels[r] for r in episode.support[j]} | {labels[r] for r in episode.query[j]} == {cls}
    assert len({e.classes for e in a}) > 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_way=5), r"n_way=5 is larger than the number of classes in the data \(4"),
        (dict(k_shot=10, n_query=5), r"k_shot \+ n_query = 10 \+ 5 = 15 examples.*class 'gold' has 12"),
        (dict(k_shot=0), "k_shot must be an integer >= 1"),
    ],
)
def test_bad_episode_spec_fails_before_encoding(data, kwargs, message):
    spec = dict(n_way=2, k_shot=1, n_query=1, episodes=2) | kwargs
    with pytest.raises(ValueError, match=message):
        n_way_k_shot(None, None, data, **spec)  # no model: the error comes first


def test_short_class_is_named_with_its_count(workdir):
    rows = synthetic_rows(per_class=6)
    rows = [r for r in rows if r["label"] != "blue"] + [r for r in rows if r["label"] == "blue"][:2]
    small = load_dataset("json", data_files=write_jsonl(workdir / "short.jsonl", rows), split="train")
    with pytest.raises(ValueError, match=r"class 'blue' has 2\.$"):
        n_way_k_shot(None, None, small, n_way=2, k_shot=2, n_query=2)


def test_missing_label_column_is_named(data):
    with pytest.raises(ValueError, match=r"label column 'category' is not in the data; its columns are \['text', 'label'\]"):
        n_way_k_shot(None, None, data, label_column="category")
    with pytest.raises(ValueError, match="label column 'category'"):
        zero_shot(None, None, data, method="description", label_column="category")


# -- prototypes -------------------------------------------------------------------------------
def test_prototype_classification_matches_numpy():
    rng = np.random.default_rng(0)
    support, queries = rng.normal(size=(5, 3, 16)), rng.normal(size=(40, 16))
    protos = support.mean(1)
    cosine = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (protos / np.linalg.norm(protos, axis=1, keepdims=True)).T
    euclid = np.sqrt(((queries[:, None, :] - protos[None]) ** 2).sum(-1))
    s, q = torch.tensor(support, dtype=torch.float32), torch.tensor(queries, dtype=torch.float32)
    assert classify(q, s, "cosine").tolist() == cosine.argmax(1).tolist()
    assert classify(q, s, "euclidean").tolist() == euclid.argmin(1).tolist()
    assert (cosine.argmax(1) != euclid.argmin(1)).any()  # the two distances are really different here


def test_mean_pooling_ignores_padding(mlm, tokenizer):
    texts = ["sky", "sky sea ocean sapphire sky sea ocean"]
    together = embed_texts(mlm, tokenizer, texts, "mean", batch_size=2)
    alone = torch.cat([embed_texts(mlm, tokenizer, [t], "mean") for t in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    batch = tokenizer(texts[:1], return_tensors="pt")
    hidden = mlm.base_model(**batch).last_hidden_state
    torch.testing.assert_close(embed_texts(mlm, tokenizer, texts[:1], "cls")[0], hidden[0, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone[0], hidden[0].mean(0), atol=1e-5, rtol=1e-4)


# -- n-way k-shot on data separable by construction, then shuffled ------------------------------
def test_separable_data_near_perfect_and_shuffled_labels_at_chance(data, tokenizer, workdir):
    encoder = OneHotEncoder(len(tokenizer))
    result = n_way_k_shot(encoder, tokenizer, data, n_way=4, k_shot=3, n_query=5, episodes=40, records=True)
    assert result.metrics["acc"] >= 0.97
    assert len(result.records) == 40 and result.records[0]["predicted"]

    rows = synthetic_rows(per_class=60, seed=1)
    labels = [r["label"] for r in rows]
    np.random.default_rng(0).shuffle(labels)
    shuffled = [dict(r, label=l) for r, l in zip(rows, labels)]
    noise = load_dataset("json", data_files=write_jsonl(workdir / "shuffled.jsonl", shuffled), split="train")
    result = n_way_k_shot(encoder, tokenizer, noise, n_way=4, k_shot=3, n_query=5, episodes=300)
    acc, ci95 = result.metrics["acc"], result.metrics["acc_ci95"]
    assert abs(acc - 0.25) <= ci95 + 0.01, result.metrics
    assert 0 < ci95 < 0.05


def test_support_from_another_split(data, tokenizer, workdir):
    support = load_dataset("json", data_files=write_jsonl(workdir / "support.jsonl", synthetic_rows(4, seed=3)), split="train")
    result = n_way_k_shot(OneHotEncoder(len(tokenizer)), tokenizer, data, support_data=support, n_way=3, k_shot=4,
                          n_query=6, episodes=10, distance="euclidean")
    assert result.metrics["acc"] >= 0.95
    with pytest.raises(ValueError, match=r"k_shot = 5 examples in the support data; class 'blue' has 4"):
        n_way_k_shot(None, tokenizer, data, support_data=support, n_way=3, k_shot=5, n_query=6)


# -- zero-shot --------------------------------------------------------------------------------
def test_cloze_matches_hand_computation(mlm, tokenizer):
    texts, template = ["sky sea", "frog lime leaf"], "{text} it is about {mask} ."
    verbalizers = {"blue": "ocean", "berry": "skyleaf"}
    pieces = tokenizer("skyleaf", add_special_tokens=False)["input_ids"]
    assert len(pieces) >= 2, "the test needs one multi-piece verbalizer"
    scores = cloze_scores(mlm, tokenizer, texts, template, verbalizers)
    ocean = tokenizer.convert_tokens_to_ids("ocean")
    for i, text in enumerate(texts):
        for label, ids in (("blue", [ocean]), ("berry", pieces)):
            prompt = f"{text} it is about {' '.join(['[MASK]'] * len(ids))} ."
            batch = tokenizer(prompt, return_tensors="pt")
            slots = (batch["input_ids"][0] == tokenizer.mask_token_id).nonzero().ravel()
            logprobs = mlm(**batch).logits[0].log_softmax(-1)
            expected = sum(logprobs[s, t].item() for s, t in zip(slots, ids)) / len(ids)
            assert scores[i, list(verbalizers).index(label)].item() == pytest.approx(expected, abs=1e-4)


def test_cloze_dataset_accuracy_and_bad_verbalizers(mlm, tokenizer, data):
    verbalizers = {"red": "apple", "green": "grass", "blue": "sky", "gold": "coin"}
    result = zero_shot(mlm, tokenizer, data, method="cloze", template="{text} it is about {mask}.",
                       verbalizers=verbalizers, records=True)
    scores = cloze_scores(mlm, tokenizer, list(data["text"]), "{text} it is about {mask}.", verbalizers)
    names = list(verbalizers)
    expected = np.mean([names[p] == lab for p, lab in zip(scores.argmax(-1).tolist(), data["label"])])
    assert result.metrics["acc"] == pytest.approx(expected) and result.n_samples == len(data)
    assert result.records[0]["predicted"] in names
    with pytest.raises(ValueError, match="the verbalizer of label 'gold' is empty"):
        zero_shot(None, tokenizer, data, method="cloze", template="{text} {mask}", verbalizers=verbalizers | {"gold": " "})
    with pytest.raises(ValueError, match=r"verbalizers has no entry for classes \['red'\]"):
        zero_shot(None, tokenizer, data, method="cloze", template="{text} {mask}", verbalizers={"green": "a", "blue": "b", "gold": "c"})
    with pytest.raises(ValueError, match=r"must contain \{mask\} exactly once"):
        zero_shot(None, tokenizer, data, method="cloze", template="{text} it is", verbalizers=verbalizers)


def test_description_zero_shot_on_separable_data(data, tokenizer):
    descriptions = {label: " ".join(words) for label, words in CLASS_WORDS.items()}
    result = zero_shot(OneHotEncoder(len(tokenizer)), tokenizer, data, method="description",
                       label_descriptions=descriptions, pooling="mean", distance="cosine")
    assert result.metrics["acc"] == 1.0
    with pytest.raises(ValueError, match=r"label_descriptions has no entry for classes \['gold'\]"):
        zero_shot(None, tokenizer, data, method="description", label_descriptions={k: v for k, v in descriptions.items() if k != "gold"})


@pytest.fixture(scope="module")
def nli(tokenizer, workdir):
    torch.manual_seed(0)
    labels = ["contradiction", "neutral", "entailment"]
    model = hfx.HfxForSequenceClassification(tiny(tokenizer, id2label=dict(enumerate(labels)),
                                                  label2id={l: i for i, l in enumerate(labels)}))
    torch.nn.init.normal_(model.score.weight, std=8.0)  # spread the logits so the ranking is not a tie
    torch.nn.init.normal_(model.pooler.dense.weight, std=1.0)  # (transformers' softmax overflows past |logit| ~ 100)
    path = workdir / "nli"
    model.save_pretrained(str(path))
    return AutoModelForSequenceClassification.from_pretrained(str(path)).eval()


def test_nli_and_pipeline_match_transformers_zero_shot_pipeline(nli, tokenizer, mlm):
    import hfx.evaluation.encoder.pipelines  # noqa: F401  registers the task

    texts, labels = ["sky sea ocean", "frog leaf", "coin crown sun honey"], ["blue", "green", "gold"]
    reference = pipeline("zero-shot-classification", model=nli, tokenizer=tokenizer)(texts, candidate_labels=labels)
    ours = pipeline("hfx-zero-shot-classification", model=nli, tokenizer=tokenizer)(texts, candidate_labels=labels)
    scores = nli_scores(nli, tokenizer, texts, labels).softmax(-1)
    for ref, got, row in zip(reference, ours, scores):
        assert got["labels"] == ref["labels"]
        assert got["scores"] == pytest.approx(ref["scores"], abs=1e-5)
        assert sorted(row.tolist(), reverse=True) == pytest.approx(ref["scores"], abs=1e-5)
    assert all(max(r["scores"]) - min(r["scores"]) > 0.05 for r in reference)  # far from a tie at 1e-5

    cloze = pipeline("hfx-zero-shot-classification", model=mlm, tokenizer=tokenizer)
    out = cloze("sky sea", candidate_labels=["blue", "green"], template="{text} it is about {mask}.",
                verbalizers={"blue": "sky", "green": "grass"})
    expected = cloze_scores(mlm, tokenizer, ["sky sea"], "{text} it is about {mask}.", {"blue": "sky", "green": "grass"})[0]
    assert out["labels"][0] == ["blue", "green"][int(expected.argmax())]
    assert sum(out["scores"]) == pytest.approx(1.0)


def test_pipeline_loads_checkpoint_with_its_own_head(workdir, tokenizer_dir, nli, mlm):
    import hfx.evaluation.encoder.pipelines  # noqa: F401

    for model, name in ((mlm, "mlm"), (nli, "nli")):
        path = workdir / name
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(path))
        loaded = pipeline("hfx-zero-shot-classification", model=str(path)).model
        assert type(loaded) is type(model)


def test_nli_needs_an_entailment_label(tokenizer, data):
    model = hfx.HfxForSequenceClassification(tiny(tokenizer, num_labels=3))
    with pytest.raises(ValueError, match="needs an 'entailment' class in model.config.label2id"):
        zero_shot(model, tokenizer, data, method="nli")
