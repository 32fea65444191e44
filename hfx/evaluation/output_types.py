"""Output types: how a task's documents and prompts become per-document records and metric items.

An *output type* (:class:`OutputType`) turns a task's documents and prompts into per-document records
(``{"doc_id", "doc", "target", "arguments", "resps", "metrics": {metric: item}}``) using a
backend. lm-eval's four types are registered here on :class:`~hfx.evaluation.scorer.CausalLMScorer`;
``generate_until`` gives one record per document and filter pipeline (as lm-eval's sample logs),
with ``"filter"`` and ``"filtered_resps"``, and its metrics are reported as ``"<metric>,<filter>"``;
other evaluators (e.g. encoder n-way k-shot) add theirs with :func:`register_output_type`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .metrics import METRICS, aggregate, exact_match, multiple_choice_scores
from .scorer import CausalLMScorer
from .tasks import Task, TaskError


@dataclass(frozen=True)
class OutputType:
    """How one ``output_type`` is evaluated.

    ``run(task, docs, contexts, backend) -> list[record]`` with one record per doc whose
    ``metrics`` maps each metric name to its per-document item (what the aggregation consumes).
    ``needs_causal_lm``: the backend must be a causal LM (checked before the model runs).
    ``check(task, docs, backend)``: raises for bad task options before any task of the run is scored.
    """

    name: str
    default_metrics: tuple[str, ...]
    run: Callable[[Task, list[dict], list[str], Any], list[dict]]
    needs_causal_lm: bool = True
    check: Callable[[Task, list[dict], Any], None] | None = None


OUTPUT_TYPES: dict[str, OutputType] = {}


def register_output_type(output_type: OutputType) -> OutputType:
    OUTPUT_TYPES[output_type.name] = output_type
    return output_type


def _record(doc_id, doc, target, arguments, resps, metrics):
    return {"doc_id": doc_id, "doc": doc, "target": target, "arguments": arguments, "resps": resps, "metrics": metrics}


def metric_names(task: Task) -> list[str]:
    if task.config.metric_list:
        return [m["metric"] for m in task.config.metric_list]
    return list(OUTPUT_TYPES[task.output_type].default_metrics)


def task_scores(task: Task, records: list[dict]) -> dict[tuple[str, str], tuple[float, Any]]:
    """``{(metric, filter): (value, stderr)}`` of one task from its per-document records."""
    names = metric_names(task)
    filters = list(dict.fromkeys(r.get("filter", "none") for r in records)) or ["none"]
    return {
        (m, f): aggregate(m, [r["metrics"][m] for r in records if r.get("filter", "none") == f])
        for f in filters for m in names
    }


def task_higher_is_better(task: Task) -> dict[str, bool]:
    """``{metric: higher_is_better}`` of one task, as its results report it."""
    return {m: METRICS[m].higher_is_better for m in metric_names(task)}


def _run_multiple_choice(task: Task, docs, contexts, scorer: CausalLMScorer):
    delimiter = task.config.target_delimiter
    choices = [task.doc_to_choice(doc) for doc in docs]
    requests = [(ctx, f"{delimiter}{c}") for ctx, cs in zip(contexts, choices) for c in cs]
    answers = iter(scorer.loglikelihood(requests, task.name))
    wanted = metric_names(task)
    records = []
    for i, (doc, ctx, cs) in enumerate(zip(docs, contexts, choices)):
        resps = [next(answers) for _ in cs]
        gold = task.doc_to_target(doc)
        scores = multiple_choice_scores([r[0] for r in resps], [r[1] for r in resps], cs, gold)
        metrics = {m: scores[m] for m in wanted if m in scores}
        records.append(_record(i, doc, gold, [[ctx, f"{delimiter}{c}"] for c in cs], resps, metrics))
    return records


def _run_loglikelihood(task: Task, docs, contexts, scorer: CausalLMScorer):
    targets = [task.doc_to_target(doc) for doc in docs]
    answers = scorer.loglikelihood(list(zip(contexts, targets)), task.name)
    wanted = metric_names(task)
    records = []
    for i, (doc, ctx, target, (ll, greedy)) in enumerate(zip(docs, contexts, targets, answers)):
        metrics = {"perplexity": ll, "acc": int(greedy)}
        records.append(_record(i, doc, target, [[ctx, target]], [[ll, greedy]], {m: metrics[m] for m in wanted}))
    return records


def _run_rolling(task: Task, docs, contexts, scorer: CausalLMScorer):
    texts = [task.doc_to_target(doc) for doc in docs]
    answers = scorer.loglikelihood_rolling(texts)
    wanted = metric_names(task)
    records = []
    for i, (doc, text, ll) in enumerate(zip(docs, texts, answers)):
        words, size = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
        metrics = {"word_perplexity": (ll, words), "byte_perplexity": (ll, size), "bits_per_byte": (ll, size)}
        records.append(_record(i, doc, text, [[text]], [ll], {m: metrics[m] for m in wanted}))
    return records


def generation_kwargs(task: Task) -> dict:
    """lm-eval's defaults: greedy, 256 new tokens, stop at the few-shot delimiter unless ``until`` is given."""
    kwargs = copy.deepcopy(task.config.generation_kwargs)
    if kwargs is None:
        return {"until": [task.config.fewshot_delimiter], "do_sample": False, "temperature": 0.0, "max_gen_toks": 256}
    kwargs.setdefault("until", [task.config.fewshot_delimiter])
    return kwargs


def _generate_metric_options(task: Task) -> dict[str, dict]:
    return {m["metric"]: {k: v for k, v in m.items() if k not in ("metric", "aggregation", "higher_is_better")}
            for m in task.config.metric_list or [{"metric": "exact_match"}]}


def _check_generate(task: Task, docs, backend) -> None:
    for name in _generate_metric_options(task):
        if name != "exact_match":
            raise TaskError(f"Task {task.name!r}: generate_until supports the metric exact_match, not {name!r}.")


def _matches(prediction, reference, options: dict) -> bool:
    if isinstance(prediction, str) and isinstance(reference, str):
        return bool(exact_match(prediction, reference, **options))
    if any(options.get(k) for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation", "ignore_numbers")):
        raise TaskError(f"exact_match options {sorted(options)} need text, got {prediction!r} and {reference!r} "
                        "(lm-eval 0.4.13 fails here too).")
    return prediction == reference


def filtered_exact_match(result, gold, options: dict) -> float:
    """exact_match of one document's filtered response ``result``, with lm-eval 0.4.13's rules.

    A string is compared with each gold (any match counts). A list (a pipeline that does not end
    with ``take_first``) scores the mean over its items against a single gold; against several
    golds, items and golds pair up as lm-eval's array comparison broadcasts them. Another value
    (e.g. from ``map``) is compared with the gold converted to its type.
    """
    if isinstance(result, list):
        if not isinstance(gold, list):
            return sum(_matches(item, gold, options) for item in result) / len(result) if result else float("nan")
        if len(result) == 1 or len(gold) == 1 or len(result) == len(gold):
            pairs = [(result[0 if len(result) == 1 else j], gold[0 if len(gold) == 1 else j])
                     for j in range(max(len(result), len(gold)))]
            return float(any(_matches(p, g, options) for p, g in pairs))
        raise TaskError(f"{len(result)} filtered responses cannot be compared with {len(gold)} golds "
                        "(lm-eval 0.4.13 fails here too).")
    if isinstance(gold, list):
        return float(any(_matches(result, g, options) for g in gold))
    if not isinstance(result, str) and type(gold) is not type(result):
        try:
            gold = type(result)(gold)
        except (TypeError, ValueError) as exc:
            raise TaskError(f"filtered response {result!r} cannot be compared with gold {gold!r}: {exc} "
                            "(lm-eval 0.4.13 fails here too; give `map` a default_value).") from None
    return float(_matches(result, str(gold) if isinstance(result, str) else gold, options))


def _run_generate(task: Task, docs, contexts, scorer: CausalLMScorer):
    kwargs = generation_kwargs(task)
    outputs = scorer.generate_until([(ctx, kwargs) for ctx in contexts])
    metric_kwargs = _generate_metric_options(task)
    golds = []
    for doc in docs:
        gold = task.doc_to_target(doc)
        golds.append(task.doc_to_choice(doc)[gold] if task.config.doc_to_choice is not None else gold)
    records = []
    for pipeline in task.filters:  # lm-eval's order: per filter, then per document
        for i, (doc, ctx, output, gold) in enumerate(zip(docs, contexts, outputs, golds)):
            resps = [output] * task.config.repeats  # greedy decoding: every repeat is the same answer
            try:
                filtered = pipeline.apply(resps, doc)
                metrics = {name: filtered_exact_match(filtered, gold, opts) for name, opts in metric_kwargs.items()}
            except TaskError as exc:
                raise TaskError(f"Task {task.name!r}, document {i}: {exc}") from None
            record = _record(i, doc, gold, [[ctx, kwargs]], resps, metrics)
            record.update(filter=pipeline.name, filtered_resps=filtered)
            records.append(record)
    return records


for _ot in (
    OutputType("multiple_choice", ("acc", "acc_norm"), _run_multiple_choice),
    OutputType("loglikelihood", ("perplexity", "acc"), _run_loglikelihood),
    OutputType("loglikelihood_rolling", ("word_perplexity", "byte_perplexity", "bits_per_byte"), _run_rolling),
    OutputType("generate_until", ("exact_match",), _run_generate, check=_check_generate),
):
    register_output_type(_ot)
