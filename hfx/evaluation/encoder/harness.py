"""Encoder evaluators as ``hfx eval`` output types: ``n_way_k_shot`` and ``zero_shot_classification``.

A task file is an lm-eval-style YAML whose ``doc_to_text`` and ``doc_to_target`` name the text
and label columns, plus these keys:

``output_type: n_way_k_shot``
    ``n_way``, ``k_shot``, ``n_query``, ``episodes``, ``seed`` (1234), ``pooling`` (mean|cls),
    ``distance`` (cosine|euclidean). Queries come from ``test_split`` (else ``validation_split``);
    support from ``fewshot_split`` when set, else from the same split. One record per episode;
    ``acc`` is the mean over episodes, ``acc_stderr`` its standard error and ``acc_ci95`` the
    95% half-width (1.96 x stderr).
``output_type: zero_shot_classification``
    ``method`` (description|cloze|nli), ``label_descriptions`` {class: text}, ``template``
    (``"{text} ... {mask} ..."``), ``verbalizers`` {class: word or [pieces]},
    ``hypothesis_template`` (``"This example is {}."``), ``pooling``, ``distance``.
    One record per document; ``acc`` as in lm-eval.

Every key is checked against the documents, the tokenizer and the model's config before any task
of the run is encoded. A model given by path is loaded with the head it was saved with.
"""

from __future__ import annotations

from ..output_types import OutputType, register_output_type
from ..metrics import METRICS, Metric, mean_stderr
from ..templates import TaskError
from .evaluators import labelled_columns, n_way_k_shot, zero_shot, zero_shot_plan
from .episodes import sample_episodes

FEW_SHOT_KEYS = {"n_way": 5, "k_shot": 1, "n_query": 15, "episodes": 100, "seed": 1234, "pooling": "mean",
                 "distance": "cosine"}
ZERO_SHOT_KEYS = {"method": None, "label_descriptions": None, "template": None, "verbalizers": None,
                  "hypothesis_template": "This example is {}.", "pooling": "mean", "distance": "cosine"}


def _options(task, defaults: dict) -> dict:
    return {key: task.config.extra.get(key, default) for key, default in defaults.items()}


def _columns(task) -> dict:
    text, label = task.config.doc_to_text, task.config.doc_to_target
    for key, value in (("doc_to_text", text), ("doc_to_target", label)):
        if not isinstance(value, str):
            raise TaskError(f"Task {task.name!r} ({task.output_type}): {key} must name a column, got {value!r}.")
    return {"text_column": text, "label_column": label}


def _support(task):
    return task.fewshot_docs() if task.fewshot["split"] is not None else None


def _checked(task, check):
    try:
        return check()
    except ValueError as exc:
        raise TaskError(f"Task {task.name!r}: {exc}") from exc


def check_n_way_k_shot(task, docs, backend) -> None:
    options, columns = _options(task, FEW_SHOT_KEYS), _columns(task)
    support = _support(task)

    def check():
        _, labels = labelled_columns(docs, **columns)
        support_labels = None if support is None else labelled_columns(support, **columns, what="support data")[1]
        sample_episodes(labels, options["n_way"], options["k_shot"], options["n_query"], 1, options["seed"],
                        support_labels)

    _checked(task, check)


def run_n_way_k_shot(task, docs, contexts, backend) -> list[dict]:
    options = _options(task, FEW_SHOT_KEYS)
    result = _checked(task, lambda: n_way_k_shot(backend.model, backend.tokenizer, docs, **_columns(task), **options,
                                                 support_data=_support(task), records=True))
    return [
        {"doc_id": r["episode"], "doc": {k: r[k] for k in ("classes", "support", "query")}, "target": r["classes"],
         "arguments": [], "resps": r["predicted"], "metrics": {"acc": r["acc"], "acc_ci95": r["acc"]}}
        for r in result.records
    ]


def check_zero_shot(task, docs, backend) -> None:
    options, columns = _options(task, ZERO_SHOT_KEYS), _columns(task)
    if options["method"] is None:
        raise TaskError(f"Task {task.name!r}: zero_shot_classification needs `method`: description, cloze or nli.")

    def check():
        _, labels = labelled_columns(docs, **columns)
        zero_shot_plan(backend.model, backend.tokenizer, sorted(set(labels)), **options)

    _checked(task, check)


def run_zero_shot(task, docs, contexts, backend) -> list[dict]:
    result = _checked(task, lambda: zero_shot(backend.model, backend.tokenizer, docs, **_columns(task),
                                              **_options(task, ZERO_SHOT_KEYS), records=True))
    return [
        {"doc_id": r["row"], "doc": doc, "target": r["label"], "arguments": [[text]], "resps": r["scores"],
         "metrics": {"acc": float(r["predicted"] == r["label"])}}
        for r, doc, text in zip(result.records, docs, contexts)
    ]


def load_encoder(path: str, attn_implementation: str | None = None):
    """``(model, tokenizer, source_path)`` for a checkpoint, with the head it was saved with.

    A convert-long checkpoint loads with its long backend and global token ids (see
    ``AutoModelForZeroShot``); ``attn_implementation`` (``--model-args``) chooses another.
    """
    from pathlib import Path

    from transformers import AutoTokenizer

    from .pipelines import AutoModelForZeroShot

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return AutoModelForZeroShot.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path), \
        path if Path(path).is_dir() else None


# The 95% half-width over episodes, as few-shot papers report it (mean +- 1.96 * std / sqrt(episodes)).
METRICS.setdefault("acc_ci95", Metric("acc_ci95", lambda xs: 1.96 * mean_stderr(xs), False))
register_output_type(OutputType("n_way_k_shot", ("acc", "acc_ci95"), run_n_way_k_shot, needs_causal_lm=False,
                                check=check_n_way_k_shot))
register_output_type(OutputType("zero_shot_classification", ("acc",), run_zero_shot, needs_causal_lm=False,
                                check=check_zero_shot))
