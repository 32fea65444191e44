"""Running tasks: output type → evaluator dispatch, model loading and checks, the ``evaluate`` entry point.

An *output type* (``OutputType``) turns a task's documents and prompts into per-document records
(``{"doc_id", "doc", "target", "arguments", "resps", "metrics": {metric: item}}``) using a
backend. lm-eval's four types are registered here on :class:`~hfx.evaluation.scorer.CausalLMScorer`;
``generate_until`` gives one record per document and filter pipeline (as lm-eval's sample logs),
with ``"filter"`` and ``"filtered_resps"``, and its metrics are reported as ``"<metric>,<filter>"``;
other evaluators (e.g. encoder n-way k-shot) add theirs with :func:`register_output_type`,
and reuse :func:`evaluate_tasks` with their own backend.
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import ResultCache, default_cache_dir, model_identity
from .metrics import METRICS, aggregate, exact_match, get_metric, multiple_choice_scores
from .results import build_results
from .scorer import CausalLMScorer, is_causal_lm
from .tasks import Task, TaskError, find_tasks

DEFAULT_FEWSHOT_SEED = 1234


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


def _metric_names(task: Task) -> list[str]:
    if task.config.metric_list:
        return [m["metric"] for m in task.config.metric_list]
    return list(OUTPUT_TYPES[task.output_type].default_metrics)


def _run_multiple_choice(task: Task, docs, contexts, scorer: CausalLMScorer):
    delimiter = task.config.target_delimiter
    choices = [task.doc_to_choice(doc) for doc in docs]
    requests = [(ctx, f"{delimiter}{c}") for ctx, cs in zip(contexts, choices) for c in cs]
    answers = iter(scorer.loglikelihood(requests))
    wanted = _metric_names(task)
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
    answers = scorer.loglikelihood(list(zip(contexts, targets)))
    wanted = _metric_names(task)
    records = []
    for i, (doc, ctx, target, (ll, greedy)) in enumerate(zip(docs, contexts, targets, answers)):
        metrics = {"perplexity": ll, "acc": int(greedy)}
        records.append(_record(i, doc, target, [[ctx, target]], [[ll, greedy]], {m: metrics[m] for m in wanted}))
    return records


def _run_rolling(task: Task, docs, contexts, scorer: CausalLMScorer):
    texts = [task.doc_to_target(doc) for doc in docs]
    answers = scorer.loglikelihood_rolling(texts)
    wanted = _metric_names(task)
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


# -- model ------------------------------------------------------------------------------------
def _check_causal_config(path: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    import hfx  # noqa: F401  (registers the hfx model type)

    config = AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    # The Auto mapping also holds model types registered at run time (hfx, third parties).
    if type(config) not in AutoModelForCausalLM._model_mapping or (architectures and not causal_arch):
        raise TaskError(
            f"{path} is a {config.model_type!r} model ({architectures or 'no architectures'}), not a causal LM; "
            "loglikelihood / generate_until tasks need one (e.g. *ForCausalLM)."
        )


def load_model(model: str | os.PathLike, *, dtype: torch.dtype | None = None):
    """``(model, tokenizer, source_path)`` from a local directory or hub id, checked to be a causal LM first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(model)
    _check_causal_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return loaded, tokenizer, path if Path(path).is_dir() else None


# -- the entry point --------------------------------------------------------------------------
def evaluate_tasks(
    tasks: Sequence[Task],
    backend: Any,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = DEFAULT_FEWSHOT_SEED,
    config: dict | None = None,
) -> tuple[dict, dict[str, list[dict]]]:
    """Validate every task, then run them on ``backend``; returns (lm-eval-shaped results, per-task records)."""
    started = time.time()
    prepared = []
    for task in tasks:  # all checks first: a bad task fails before any model work
        if task.output_type not in OUTPUT_TYPES:
            raise TaskError(
                f"Task {task.name!r}: output_type {task.output_type!r} has no evaluator; known: {sorted(OUTPUT_TYPES)}."
            )
        for name in _metric_names(task):
            get_metric(name)
        k = task.effective_num_fewshot(num_fewshot)
        all_docs = task.eval_docs()
        docs = all_docs[:limit] if limit else all_docs
        task.validate(k, docs)
        if OUTPUT_TYPES[task.output_type].check is not None:
            OUTPUT_TYPES[task.output_type].check(task, docs, backend)
        prepared.append((task, k, docs, len(all_docs), task.contexts(docs, k, seed)))
    records, summaries = {}, []
    for task, k, docs, n_original, contexts in prepared:
        recs = OUTPUT_TYPES[task.output_type].run(task, docs, contexts, backend)
        records[task.name] = recs
        names = _metric_names(task)
        filters = list(dict.fromkeys(r.get("filter", "none") for r in recs)) or ["none"]
        scores = {
            (m, f): aggregate(m, [r["metrics"][m] for r in recs if r.get("filter", "none") == f])
            for f in filters for m in names
        }
        summaries.append(
            {
                "name": task.name,
                "scores": scores,
                "config": {**task.config.to_dict(), "num_fewshot": k},
                "version": task.version,
                "num_fewshot": k,
                "higher_is_better": {m: METRICS[m].higher_is_better for m in names},
                "n_original": n_original,
                "n_effective": len(docs),
            }
        )
    run_config = {"limit": limit, "random_seed": 0, "numpy_seed": 1234, "torch_seed": seed, "fewshot_seed": seed}
    run_config.update(config or {})
    return build_results(summaries, run_config, started, time.time()), records


def evaluate(
    model,
    tasks: str | Iterable[str | Task],
    *,
    num_fewshot: int | None = None,
    tokenizer=None,
    include_path: str | os.PathLike | Iterable[str | os.PathLike] = (),
    batch_size: int | None = None,
    max_batch_tokens: int = 4096,
    limit: int | None = None,
    seed: int = DEFAULT_FEWSHOT_SEED,
    allow_code: bool = False,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
    return_records: bool = False,
    add_special_tokens: bool | None = None,
):
    """Evaluate a causal LM (object or path/id) on tasks (names, tag names or :class:`Task` objects).

    Task files are resolved and every task is checked (unknown names, template fields, few-shot
    pool size, causal model) before the model is loaded or run. ``cache_dir=False`` disables the
    result cache; ``None`` uses ``$HFX_EVAL_CACHE`` or ``~/.cache/hfx/eval``. ``add_special_tokens``
    is lm-eval's ``add_bos_token``: ``None`` keeps the tokenizer's default (lm-eval's default too);
    ``False`` suits models trained without special tokens around documents (hfx quickstart).
    Returns the lm-eval-shaped results dict (and the per-task records with ``return_records``).
    """
    includes = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    names = [t for t in tasks if isinstance(t, str)]
    loaded = {t.name: t for t in find_tasks(names, includes, allow_code=allow_code)} if names else {}
    task_objs = [t if isinstance(t, Task) else None for t in tasks]
    resolved = [t for t in task_objs if t is not None] + list(loaded.values())
    for task in resolved:
        task.validate(task.effective_num_fewshot(num_fewshot))
    needs_lm = any(OUTPUT_TYPES[t.output_type].needs_causal_lm for t in resolved if t.output_type in OUTPUT_TYPES)
    source = None
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        model_name = str(model)
        if needs_lm:
            _check_causal_config(str(model))
        model, loaded_tokenizer, source = load_model(model) if needs_lm else load_encoder(model_name)
        tokenizer = tokenizer or loaded_tokenizer
    elif needs_lm and not is_causal_lm(model):
        raise TaskError(
            f"{type(model).__name__} is not a causal LM; loglikelihood / generate_until tasks need one (e.g. *ForCausalLM)."
        )
    if tokenizer is None:
        raise ValueError("A tokenizer is required when `model` is a model object.")
    torch.manual_seed(seed)
    cache = None
    identity = model_identity(model, tokenizer, source)
    if cache_dir is not False:
        cache = ResultCache(cache_dir or default_cache_dir(), identity)
    scorer = CausalLMScorer(
        model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens, cache=cache, progress=progress,
        add_special_tokens=add_special_tokens,
    )
    config = {
        "model": model_name,
        "model_identity": identity,
        "batch_size": batch_size,
        "max_batch_tokens": max_batch_tokens,
        "add_special_tokens": add_special_tokens,
    }
    results, records = evaluate_tasks(resolved, scorer, num_fewshot=num_fewshot, limit=limit, seed=seed, config=config)
    results["config"]["cache_hits"] = cache.hits if cache is not None else 0
    return (results, records) if return_records else results


from .encoder.harness import load_encoder  # noqa: E402  registers the encoder output types
