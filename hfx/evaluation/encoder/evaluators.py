"""Dataset-level encoder evaluators: n-way k-shot episodes and zero-shot classification.

``data`` is a ``datasets.Dataset`` or a list of row dicts; ``text_column`` and ``label_column``
name its columns. Class names are the values of the label column (a ``ClassLabel`` column gives
its names); label descriptions and verbalizers are keyed by these names. Every argument is
checked against the data (and, for cloze, the tokenizer) before the model encodes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .embedding import check_pooling, embed_texts
from .episodes import sample_episodes
from .prototypes import check_distance, classify, mean_and_ci95
from .zeroshot import (
    DEFAULT_HYPOTHESIS,
    check_hypothesis_template,
    check_method,
    cloze_scores,
    description_scores,
    entailment_id,
    nli_scores,
    verbalizer_ids,
)


@dataclass
class EncoderResult:
    """``metrics``: ``acc``, ``acc_stderr`` and (episodes) ``acc_ci95``, the 95% half-width; ``records`` on request."""

    metrics: dict
    n_samples: int
    config: dict
    records: list | None = field(default=None, repr=False)


def _column_names(data) -> list[str]:
    if hasattr(data, "column_names"):
        return list(data.column_names)
    return list(data[0]) if len(data) else []


def labelled_columns(data, text_column: str, label_column: str, what: str = "data") -> tuple[list[str], list[str]]:
    """(texts, class names) of every row; a missing column is an error naming the columns there are."""
    columns = _column_names(data)
    for role, name in (("label", label_column), ("text", text_column)):
        if name not in columns:
            raise ValueError(f"{role} column {name!r} is not in the {what}; its columns are {columns}.")
    if hasattr(data, "column_names"):
        texts, labels = list(data[text_column]), list(data[label_column])
        names = getattr(data.features[label_column], "names", None)
        if names is not None:
            labels = [names[i] for i in labels]
    else:
        texts, labels = [row[text_column] for row in data], [row[label_column] for row in data]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"text column {text_column!r} of the {what} must hold strings; row {bad} is {texts[bad]!r}.")
    return texts, [str(label) for label in labels]


def n_way_k_shot(model, tokenizer, data, *, text_column: str = "text", label_column: str = "label", n_way: int = 5,
                 k_shot: int = 1, n_query: int = 15, episodes: int = 100, seed: int = 1234, pooling: str = "mean",
                 distance: str = "cosine", support_data=None, batch_size: int = 32, records: bool = False) -> EncoderResult:
    """Mean episode accuracy of nearest-prototype classification, with its 95% confidence interval.

    Support and queries come from ``data``, or the support from ``support_data`` and the queries
    from ``data`` (e.g. a train and a test split). Each distinct row is embedded once.
    """
    check_pooling(pooling)
    check_distance(distance)
    texts, labels = labelled_columns(data, text_column, label_column)
    if support_data is None:
        support_texts, support_labels = texts, None
    else:
        support_texts, support_labels = labelled_columns(support_data, text_column, label_column, "support data")
    drawn = sample_episodes(labels, n_way, k_shot, n_query, episodes, seed, support_labels)

    query_rows = sorted({int(r) for e in drawn for r in e.query.ravel()})
    support_rows = sorted({int(r) for e in drawn for r in e.support.ravel()})
    query_emb = dict(zip(query_rows, embed_texts(model, tokenizer, [texts[r] for r in query_rows], pooling, batch_size)))
    if support_data is None:
        missing = [r for r in support_rows if r not in query_emb]
        query_emb.update(zip(missing, embed_texts(model, tokenizer, [texts[r] for r in missing], pooling, batch_size)))
        support_emb = query_emb
    else:
        support_emb = dict(zip(support_rows, embed_texts(model, tokenizer, [support_texts[r] for r in support_rows],
                                                         pooling, batch_size)))

    accuracies, kept = [], []
    for episode in drawn:
        support = torch.stack([torch.stack([support_emb[int(r)] for r in row]) for row in episode.support])
        query = torch.stack([query_emb[int(r)] for r in episode.query.ravel()])
        truth = torch.arange(n_way).repeat_interleave(n_query)
        predicted = classify(query, support, distance)
        accuracy = (predicted == truth).double().mean().item()
        accuracies.append(accuracy)
        if records:
            kept.append({
                "episode": episode.index,
                "classes": list(episode.classes),
                "support": episode.support.tolist(),
                "query": episode.query.tolist(),
                "predicted": [episode.classes[p] for p in predicted.tolist()],
                "acc": accuracy,
            })
    mean, stderr, ci95 = mean_and_ci95(accuracies)
    config = dict(n_way=n_way, k_shot=k_shot, n_query=n_query, episodes=episodes, seed=seed, pooling=pooling,
                  distance=distance)
    return EncoderResult({"acc": mean, "acc_stderr": stderr, "acc_ci95": ci95}, episodes, config, kept if records else None)



def _label_map(given: Mapping | None, classes: list[str], what: str) -> dict[str, str | list]:
    """``given`` keyed by class name (must cover every class in the data), or each class's own name."""
    if given is None:
        return {c: c for c in classes}
    given = {str(k): v for k, v in given.items()}
    missing = [c for c in classes if c not in given]
    if missing:
        raise ValueError(f"{what} has no entry for classes {missing} of the data; it has {list(given)}.")
    return given


def zero_shot_plan(model, tokenizer, classes, *, method, label_descriptions=None, template=None,
                   verbalizers=None, hypothesis_template=DEFAULT_HYPOTHESIS, pooling="mean", distance="cosine",
                   batch_size=32):
    """Check every zero-shot argument (nothing is encoded) and return (candidates, config, score(texts))."""
    check_method(method)
    config = dict(method=method)
    if method == "description":
        check_pooling(pooling)
        check_distance(distance)
        candidates = _label_map(label_descriptions, classes, "label_descriptions")
        config.update(pooling=pooling, distance=distance, label_descriptions=candidates)
        return candidates, config, lambda texts: description_scores(
            model, tokenizer, texts, list(candidates.values()), pooling, distance, batch_size)
    if method == "cloze":
        if template is None:
            raise ValueError("cloze zero-shot needs a template with {text} and {mask}, e.g. '{text} It was {mask}.'")
        candidates = _label_map(verbalizers, classes, "verbalizers")
        verbalizer_ids(tokenizer, template, candidates)
        config.update(template=template, verbalizers=candidates)
        return candidates, config, lambda texts: cloze_scores(model, tokenizer, texts, template, candidates, batch_size)
    check_hypothesis_template(hypothesis_template)
    entailment_id(model)
    candidates = _label_map(label_descriptions, classes, "label_descriptions")
    config.update(hypothesis_template=hypothesis_template, label_descriptions=candidates)
    return candidates, config, lambda texts: nli_scores(
        model, tokenizer, texts, list(candidates.values()), hypothesis_template, batch_size)


def zero_shot(model, tokenizer, data, *, method: str, text_column: str = "text", label_column: str = "label",
              label_descriptions: Mapping | None = None, template: str | None = None,
              verbalizers: Mapping | None = None, hypothesis_template: str = DEFAULT_HYPOTHESIS,
              pooling: str = "mean", distance: str = "cosine", batch_size: int = 32,
              records: bool = False) -> EncoderResult:
    """Accuracy of zero-shot classification by ``method`` (``description``, ``cloze`` or ``nli``).

    The candidate classes are the keys of ``label_descriptions`` / ``verbalizers`` (they may name
    classes absent from the data, never miss one present), or the classes of the data. Without
    descriptions or verbalizers a class is described by its own name.
    """
    texts, labels = labelled_columns(data, text_column, label_column)
    candidates, config, score = zero_shot_plan(
        model, tokenizer, sorted(set(labels)), method=method, label_descriptions=label_descriptions,
        template=template, verbalizers=verbalizers, hypothesis_template=hypothesis_template, pooling=pooling,
        distance=distance, batch_size=batch_size,
    )
    names = list(candidates)
    scores = score(texts)
    predicted = scores.argmax(-1).tolist()
    correct = [float(names[p] == label) for p, label in zip(predicted, labels)]
    mean, stderr, _ = mean_and_ci95(correct)
    kept = None
    if records:
        kept = [
            {"row": i, "label": label, "predicted": names[p], "scores": dict(zip(names, row))}
            for i, (label, p, row) in enumerate(zip(labels, predicted, scores.tolist()))
        ]
    return EncoderResult({"acc": mean, "acc_stderr": stderr}, len(texts), config, kept)
