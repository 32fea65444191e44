"""Output types: how a task's documents and prompts become per-document records and metric items.

An *output type* (:class:`OutputType`) turns a task's documents and prompts into per-document records
(``{"doc_id", "doc", "target", "arguments", "resps", "metrics": {metric: item}}``) using a
backend. lm-eval's four types are registered here on :class:`~hfx.evaluation.scorer.CausalLMScorer`;
``generate_until`` gives one record per document and filter pipeline (as lm-eval's sample logs),
with ``"filter"`` and ``"filtered_resps"``, and its metrics are reported as ``"<metric>,<filter>"``;
``class`` runs lm-eval Task subclasses (:mod:`.class_tasks`); other evaluators (e.g. encoder n-way k-shot) add theirs with :func:`register_output_type`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .metrics import AGGREGATIONS, METRICS, aggregate, exact_match, generate_items, multiple_choice_scores
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


LM_OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


@dataclass(frozen=True)
class MetricSpec:
    """One ``metric_list`` entry as lm-eval 0.4.13 reads it.

    ``fn``: a ``!function`` metric (``name`` is then its ``__name__``); ``kwargs``: the entry's other
    keys, passed to the metric; ``aggregation``: ``None`` (the metric's default), a registry name, or
    a ``!function``; ``higher_is_better``: the entry's override, else the registry's (``None`` if unknown).
    """

    name: str
    fn: Callable | None = None
    kwargs: dict = field(default_factory=dict)
    aggregation: str | Callable | None = None
    higher_is_better: bool | None = None


def _known_aggregations() -> set[str]:
    return set(AGGREGATIONS)


def metric_specs(task: Task) -> dict[str, MetricSpec]:
    """``{name: MetricSpec}`` of a task, checked as lm-eval's ConfigurableTask checks them (cached on the task).

    Raises TaskError for what lm-eval cannot run offline (an ``evaluate`` hub metric) or fails on (a
    metric with no default aggregation, an unknown aggregation name, an entry without ``metric``).
    """
    cached = task.__dict__.get("_metric_specs")
    if cached is not None:
        return cached
    config, specs = task.config, {}
    if not config.metric_list:
        for name in OUTPUT_TYPES[task.output_type].default_metrics if task.output_type in OUTPUT_TYPES else ():
            specs[name] = MetricSpec(name, higher_is_better=METRICS[name].higher_is_better if name in METRICS else None)
        task.__dict__["_metric_specs"] = specs
        return specs
    if not isinstance(config.metric_list, list):
        raise TaskError(f"Task {task.name!r}: metric_list must be a list of {{metric: ...}} entries.")
    # other evaluators' output types (encoder n-way k-shot, ...) name their own metrics
    scored_by_hook = callable(config.process_results) or task.output_type not in LM_OUTPUT_TYPES
    for entry in config.metric_list:
        if not isinstance(entry, dict) or "metric" not in entry:
            raise TaskError(f"Task {task.name!r}: every metric_list entry needs a `metric` key, got {entry!r}.")
        metric = entry["metric"]
        kwargs = {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better", "hf_evaluate")}
        fn = None
        if callable(metric):  # scored by a process_results hook, only its name counts
            fn, name = (None if scored_by_hook else metric), getattr(metric, "__name__", repr(metric))
        elif isinstance(metric, str):
            name = metric
            # lm-eval loads the hub metric's function, but only generate_until calls it: the other output
            # types compute their items (acc, f1's (gold, pred), ...) themselves, so those tasks run offline
            if entry.get("hf_evaluate") is True and not scored_by_hook and task.output_type == "generate_until":
                raise TaskError(f"Task {task.name!r}: metric {name!r} sets `hf_evaluate: true`, which loads a Hugging "
                                "Face `evaluate` metric from the hub; hfx does not download metrics (lm-eval fails "
                                "offline too). Use one of " + ", ".join(sorted(METRICS)) + " or a !function metric.")
            if name not in METRICS and not scored_by_hook:
                raise TaskError(f"Task {task.name!r}: metric {name!r} is not in lm-eval's registry, so lm-eval would "
                                "load it from the Hugging Face `evaluate` hub, which hfx does not do. Known metrics: "
                                + ", ".join(sorted(METRICS)) + "; or give a !function metric.")
        else:
            raise TaskError(f"Task {task.name!r}: metric {metric!r} must be a metric name or a !function.")
        aggregation = entry.get("aggregation")
        if aggregation is None:
            if name not in METRICS and task.output_type in LM_OUTPUT_TYPES:
                raise TaskError(f"Task {task.name!r}: metric {name!r} has no default aggregation; give it "
                                "`aggregation:` (a name such as mean, or a !function). lm-eval 0.4.13 fails on it too.")
        elif isinstance(aggregation, str):
            if aggregation not in _known_aggregations():
                raise TaskError(f"Task {task.name!r}: metric {name!r} has unknown aggregation {aggregation!r}; known: "
                                + ", ".join(sorted(_known_aggregations())) + " or a !function.")
        elif not callable(aggregation):
            raise TaskError(f"Task {task.name!r}: metric {name!r}: aggregation must be a name or a !function, "
                            f"got {aggregation!r}.")
        hib = entry["higher_is_better"] if "higher_is_better" in entry else (
            METRICS[name].higher_is_better if name in METRICS else None)
        specs[name] = MetricSpec(name, fn, kwargs, aggregation, hib)
    task.__dict__["_metric_specs"] = specs
    return specs


def reported_metrics(task: Task) -> set[str] | None:
    """The metric names a task's results will hold, or None when only running it tells
    (a ``process_results`` hook without ``metric_list``, a Python ``class:`` task)."""
    if task.output_type == "class" or (callable(task.config.process_results) and not task.config.metric_list):
        return None
    return set(metric_specs(task))


def metric_names(task: Task) -> list[str]:
    """The registry metrics a task's scores use (what the evaluator checks with ``get_metric``).

    Checks the whole ``metric_list`` (:func:`metric_specs`) on the way: ``!function`` metrics and the
    free-form names of a ``process_results`` hook are valid without being registry names, so they
    are not listed here.
    """
    specs = metric_specs(task)
    if task.output_type in LM_OUTPUT_TYPES and callable(task.config.process_results):
        return []
    return [name for name, spec in specs.items() if spec.fn is None]


def _spec_for(task: Task, key: str) -> MetricSpec | None:
    return metric_specs(task).get(key) or task.__dict__.get("_metric_aliases", {}).get(key)


def task_scores(task: Task, records: list[dict], *, bootstrap_iters: int = 100_000
                ) -> dict[tuple[str, str], tuple[float, Any]]:
    """``{(metric, filter): (value, stderr)}`` of one task from its per-document records, as lm-eval aggregates.

    Every key the documents report is aggregated (a ``process_results`` hook may report keys
    ``metric_list`` does not name: lm-eval takes their mean), with the entry's ``aggregation``;
    a stderr lm-eval cannot give (one document, an aggregation without a known stderr) is ``"N/A"``.
    """
    out: dict[tuple[str, str], tuple[float, Any]] = {}
    filters = list(dict.fromkeys(r.get("filter", "none") for r in records))
    for f in filters:
        recs = [r for r in records if r.get("filter", "none") == f]
        for key in dict.fromkeys(k for r in recs for k in r["metrics"]):
            items = [r["metrics"][key] for r in recs if key in r["metrics"]]
            spec = _spec_for(task, key)
            aggregation = "mean" if spec is None else spec.aggregation
            try:
                value, stderr = aggregate(key, items, aggregation=aggregation, bootstrap_iters=bootstrap_iters)
            except TaskError:
                raise
            except Exception as exc:
                what = aggregation if isinstance(aggregation, str) or aggregation is None else getattr(
                    aggregation, "__qualname__", repr(aggregation))
                raise TaskError(f"Task {task.name!r}: aggregating metric {key!r} (aggregation {what or 'default'}) "
                                f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
            out[(key, f)] = (value, stderr if len(items) > 1 else "N/A")
    return out


def task_higher_is_better(task: Task) -> dict[str, bool | None]:
    """``{metric: higher_is_better}`` of one task, as its results report it (overrides of metric_list honoured)."""
    own = getattr(task, "metric_directions", None)  # a class task reports its object's higher_is_better()
    if callable(own):
        return own()
    out = {name: spec.higher_is_better for name, spec in metric_specs(task).items()}
    out.update({k: s.higher_is_better for k, s in task.__dict__.get("_metric_aliases", {}).items() if k not in out})
    return out


def _process_results(task: Task, doc: dict, results: list) -> dict:
    """The task's own ``process_results(doc, results)`` hook: a dict of metric values for one document."""
    metrics = task.call("process_results", task.config.process_results, doc, results)
    if not isinstance(metrics, dict):
        raise TaskError(f"Task {task.name!r}, document {task.doc_index}: process_results must return a dict of "
                        f"metric values, got {type(metrics).__name__}.")
    return metrics


def _single_context(task: Task, ctx) -> str:
    if isinstance(ctx, list):
        raise TaskError(f"Task {task.name!r}: doc_to_text gives an index (a multiple-input task), which lm-eval "
                        f"scores only with output_type multiple_choice, not {task.output_type}.")
    return ctx


def _run_multiple_choice(task: Task, docs, contexts, scorer: CausalLMScorer):
    delimiter = task.choice_delimiter()  # target_delimiter, or lm-eval's rule under a chat template
    specs = metric_specs(task)
    mutual = "acc_mutual_info" in specs  # lm-eval then also scores each choice after an empty context
    multiple_input = task.multiple_input
    prepared = []
    for i, (doc, ctx) in enumerate(zip(docs, contexts)):
        task.doc_index = i
        choices = task.doc_to_choice(doc)
        if multiple_input:  # one context per choice, the same continuation after each
            continuation = task.doc_to_target(doc)
            arguments = [(c, f"{delimiter}{continuation}") for c in ctx]
        else:
            arguments = [(ctx, f"{delimiter}{c}") for c in choices]
        if mutual:
            arguments += [("", f"{delimiter}{c}") for c in choices]
        prepared.append((choices, arguments))
    answers = iter(scorer.loglikelihood([a for _, args in prepared for a in args], task.name))
    records = []
    for i, (doc, (choices, arguments)) in enumerate(zip(docs, prepared)):
        task.doc_index = i
        resps = [next(answers) for _ in arguments]
        gold = task.doc_to_text(doc) if multiple_input else task.doc_to_target(doc)
        if callable(task.config.process_results):
            metrics = _process_results(task, doc, [tuple(r) for r in resps])
        else:
            n = len(choices)
            lls, greedy = [r[0] for r in resps], [r[1] for r in resps]
            extra = {"lls_unconditional": lls[n:]} if mutual and len(lls) == 2 * n else {}
            scores = multiple_choice_scores(lls[:n], greedy, choices, gold, **extra)
            metrics = {m: scores[m] for m in specs if m in scores}
        records.append(_record(i, doc, task.doc_to_target(doc), [list(a) for a in arguments], resps, metrics))
    task.doc_index = None
    return records


def _run_loglikelihood(task: Task, docs, contexts, scorer: CausalLMScorer):
    contexts = [_single_context(task, c) for c in contexts]
    targets = []
    for i, doc in enumerate(docs):
        task.doc_index = i
        targets.append(task.doc_to_target(doc))
    answers = scorer.loglikelihood(list(zip(contexts, targets)), task.name)
    specs = metric_specs(task)
    records = []
    for i, (doc, ctx, target, (ll, greedy)) in enumerate(zip(docs, contexts, targets, answers)):
        task.doc_index = i
        if callable(task.config.process_results):
            metrics = _process_results(task, doc, [(ll, greedy)])
        else:
            scores = {"perplexity": ll, "acc": int(greedy)}
            metrics = {m: scores[m] for m in specs if m in scores}
        records.append(_record(i, doc, target, [[ctx, target]], [[ll, greedy]], metrics))
    task.doc_index = None
    return records


def _run_rolling(task: Task, docs, contexts, scorer: CausalLMScorer):
    texts = []
    for i, doc in enumerate(docs):
        task.doc_index = i
        texts.append(task.doc_to_target(doc))
    answers = scorer.loglikelihood_rolling(texts)
    specs = metric_specs(task)
    records = []
    for i, (doc, text, ll) in enumerate(zip(docs, texts, answers)):
        task.doc_index = i
        if callable(task.config.process_results):
            metrics = _process_results(task, doc, [ll])
        else:
            words, size = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
            scores = {"word_perplexity": (ll, words), "byte_perplexity": (ll, size), "bits_per_byte": (ll, size)}
            metrics = {m: scores[m] for m in specs if m in scores}
        records.append(_record(i, doc, text, [[text]], [ll], metrics))
    task.doc_index = None
    return records


def generation_kwargs(task: Task) -> dict:
    """lm-eval's defaults: greedy, 256 new tokens, stop at the few-shot delimiter unless ``until`` is given."""
    kwargs = copy.deepcopy(task.config.generation_kwargs)
    if kwargs is None:
        return {"until": [task.config.fewshot_delimiter], "do_sample": False, "temperature": 0.0, "max_gen_toks": 256}
    kwargs.setdefault("until", [task.config.fewshot_delimiter])
    return kwargs


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


def _generate_scores(task: Task, specs: dict[str, MetricSpec], doc: dict, result) -> dict:
    """Every metric of one filtered response, as lm-eval 0.4.13's generate_until process_results gives them."""
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    functions = {name: spec.fn for name, spec in specs.items() if spec.fn is not None}
    items = generate_items({name: spec.kwargs for name, spec in specs.items()}, task.doc_to_target(doc), result,
                           choices=choices, multiple_target=task.multiple_target, functions=functions)
    new = [key for key in items if key not in specs and key not in task.__dict__.get("_metric_aliases", {})]
    if new:  # keys of a metric returning a dict take that entry's aggregation and direction, as in lm-eval
        aliases = task.__dict__.setdefault("_metric_aliases", {})
        for name, fn in functions.items():
            single = generate_items({name: specs[name].kwargs}, task.doc_to_target(doc), result, choices=choices,
                                    multiple_target=task.multiple_target, functions={name: fn})
            for key in single:
                if key not in specs:
                    aliases.setdefault(key, dataclasses.replace(specs[name], name=key))
    return items


def _run_generate(task: Task, docs, contexts, scorer: CausalLMScorer):
    contexts = [_single_context(task, c) for c in contexts]
    kwargs = generation_kwargs(task)
    outputs = scorer.generate_until([(ctx, kwargs) for ctx in contexts])
    specs = metric_specs(task)
    hook = callable(task.config.process_results)
    targets = []
    for i, doc in enumerate(docs):
        task.doc_index = i
        target = task.doc_to_target(doc)
        targets.append(task.doc_to_choice(doc)[target] if task.config.doc_to_choice is not None else target)
    records = []
    all_resps = [[output] * task.config.repeats for output in outputs]  # greedy: every repeat is the same answer
    for pipeline in task.filters:  # lm-eval's order: per filter, then per document
        try:  # once per pipeline over every document, as lm-eval's FilterEnsemble (task code sees them all)
            all_filtered = pipeline.apply_all(all_resps, list(docs))
        except TaskError as exc:
            raise TaskError(f"Task {task.name!r}: {exc}") from None
        for i, (doc, ctx, resps, filtered, target) in enumerate(zip(docs, contexts, all_resps, all_filtered, targets)):
            task.doc_index = i
            try:
                if hook:
                    metrics = _process_results(task, doc, [filtered])
                else:
                    metrics = _generate_scores(task, specs, doc, filtered)
            except TaskError as exc:
                if str(exc).startswith(f"Task {task.name!r}"):
                    raise
                raise TaskError(f"Task {task.name!r}, document {i}: {exc}") from None
            record = _record(i, doc, target, [[ctx, kwargs]], resps, metrics)
            record.update(filter=pipeline.name, filtered_resps=filtered)
            records.append(record)
    task.doc_index = None
    return records


def _check_types(task: Task, docs, backend) -> None:
    metric_specs(task)


for _ot in (
    OutputType("multiple_choice", ("acc", "acc_norm"), _run_multiple_choice, check=_check_types),
    OutputType("loglikelihood", ("perplexity", "acc"), _run_loglikelihood, check=_check_types),
    OutputType("loglikelihood_rolling", ("word_perplexity", "byte_perplexity", "bits_per_byte"), _run_rolling,
               check=_check_types),
    OutputType("generate_until", ("exact_match",), _run_generate, check=_check_types),
):
    register_output_type(_ot)


from .class_tasks import CLASS_OUTPUT_TYPE, check_backend, run_class_task  # noqa: E402  (imports this module)

register_output_type(OutputType(CLASS_OUTPUT_TYPE, (), run_class_task, check=check_backend))
