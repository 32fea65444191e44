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

from ..checkpoint_check import CheckpointError, check_model_dir
from ..quantization import pin_bnb_cpu_path
from ..safe_paths import blocking_parent
from .cache import ContentHashMemo, ResultCache, default_cache_dir, model_identity
from .metrics import METRICS, aggregate, exact_match, get_metric, multiple_choice_scores
from .results import build_results
from .scorer import CausalLMScorer, is_causal_lm
from .tasks import Task, TaskError, find_tasks

DEFAULT_FEWSHOT_SEED = 1234


class EvaluationInputError(ValueError):
    """An argument of :func:`evaluate` (or ``hfx eval``) that cannot be used; raised before any model work."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_arguments(
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    max_batch_tokens: int = 4096,
    seed: int = DEFAULT_FEWSHOT_SEED,
) -> None:
    """Raise :class:`EvaluationInputError` naming the first bad value (and what is valid)."""
    minimum = {"num_fewshot": 0, "limit": 1, "batch_size": 1, "max_batch_tokens": 1}
    values = {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens}
    for name, value in values.items():
        if value is None and name != "max_batch_tokens":
            continue
        if not _is_int(value) or value < minimum[name]:
            optional = "" if name == "max_batch_tokens" else " (or None)"
            raise EvaluationInputError(f"{name} must be an integer >= {minimum[name]}{optional}, got {value!r}.")
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise EvaluationInputError(f"seed must be an integer in [0, 2**63), got {seed!r}.")


def task_names(tasks: str | Iterable[str | Task]) -> list[str | Task]:
    """The task names (and :class:`Task` objects) asked for; an empty list is an error."""
    given = tasks
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    else:
        tasks = [t.strip() if isinstance(t, str) else t for t in tasks]
        tasks = [t for t in tasks if not isinstance(t, str) or t]
    if not tasks:
        raise EvaluationInputError(
            f"no task names in {given!r}: give one or more comma-separated task or tag names (e.g. embedded_facts)."
        )
    return tasks


def _check_cache_dir(cache_dir) -> None:
    if cache_dir is False:
        return
    directory = Path(cache_dir or default_cache_dir()).expanduser()
    # the directory itself counts as the first "parent": blocking_parent looks at what exists
    blocked = blocking_parent(directory / "cache.jsonl")
    if blocked is not None:
        parent, why = blocked
        problem = "is not a directory" if why == "file" else "is not writable"
        raise EvaluationInputError(f"cache directory {str(directory)!r}: {str(parent)!r} {problem}.")


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
    answers = iter(scorer.loglikelihood(requests, task.name))
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
    answers = scorer.loglikelihood(list(zip(contexts, targets)), task.name)
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
def _load_config(path: str):
    """The model's config, every failure as one :class:`CheckpointError` line."""
    from transformers import AutoConfig

    import hfx  # noqa: F401  (registers the hfx model type)

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"--model {path}: its config cannot be used: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:397] + "..."


def _check_tokenizer(tokenizer, where: str) -> None:
    if not tokenizer.encode("the cat", add_special_tokens=False):
        raise CheckpointError(f"{where}: the tokenizer encodes text to no tokens (an empty vocabulary: was the "
                              "tokenizer saved with the model? tokenizer.save_pretrained(folder))")


def check_model_path(path: str | os.PathLike) -> None:
    """Cheap checks of a model folder (config.json, weight headers, config values); hub ids pass to transformers."""
    check_model_dir(path, what="--model")
    _load_config(str(path))


def _check_causal_config(path: str) -> None:
    from transformers import AutoModelForCausalLM

    config = _load_config(path)
    architectures = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    # The Auto mapping also holds model types registered at run time (hfx, third parties).
    if type(config) not in AutoModelForCausalLM._model_mapping or (architectures and not causal_arch):
        raise TaskError(
            f"{path} is a {config.model_type!r} model ({architectures or 'no architectures'}), not a causal LM; "
            "loglikelihood / generate_until tasks need one (e.g. *ForCausalLM)."
        )


def load_model(
    model: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    add_bos_token: bool | None = None,
    causal: bool = True,
):
    """``(model, tokenizer, source_path)`` from a local directory or hub id, checked first.

    The folder, its config and the headers of its weight files are checked (one-line
    :class:`~hfx.checkpoint_check.CheckpointError`), then that it is a causal LM (``causal=False``:
    an encoder with the head it was saved with). ``add_bos_token`` is passed to the tokenizer as
    lm-eval's ``HFLM`` does (a fast tokenizer then rebuilds its post-processor: BOS or nothing
    before the text, nothing after it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(model)
    check_model_path(path)
    if not causal:
        return load_encoder(path)
    _check_causal_config(path)
    kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"--model {path}: its tokenizer cannot be loaded: {_one_line(exc)}") from None
    _check_tokenizer(tokenizer, f"--model {path}")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--model {path}: the model cannot be loaded: {_one_line(exc)}") from None
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
    check_arguments(num_fewshot=num_fewshot, limit=limit, seed=seed)
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
    add_bos_token: bool | None = None,
    add_special_tokens: bool | None = None,
):
    """Evaluate a causal LM (object or path/id) on tasks (names, tag names or :class:`Task` objects).

    Arguments, the model folder (config, weight headers), task files and every task (unknown
    names, template fields, few-shot pool size, causal model) are checked before the model is
    loaded or run. ``cache_dir=False`` disables the result cache; ``None`` uses
    ``$HFX_EVAL_CACHE`` or ``~/.cache/hfx/eval``. ``add_bos_token`` is lm-eval's switch: ``None``
    keeps the tokenizer's default special tokens (lm-eval's default too); ``False`` suits models
    trained without special tokens around documents (hfx quickstart); ``add_special_tokens`` is
    the older name of the same switch. ``seed`` seeds the few-shot draws and, per request, sampling.
    Returns the lm-eval-shaped results dict (and the per-task records with ``return_records``).
    """
    if add_special_tokens is not None and add_bos_token is not None and add_special_tokens != add_bos_token:
        raise EvaluationInputError(
            f"add_bos_token={add_bos_token!r} and add_special_tokens={add_special_tokens!r} disagree; "
            "they are the same switch, give one."
        )
    add_bos = add_bos_token if add_bos_token is not None else add_special_tokens
    if add_bos is not None and not isinstance(add_bos, bool):
        raise EvaluationInputError(f"add_bos_token must be True, False or None, got {add_bos!r}.")
    check_arguments(num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                    seed=seed)
    tasks = task_names(tasks)
    _check_cache_dir(cache_dir)
    is_path = isinstance(model, (str, os.PathLike))
    if is_path:
        check_model_path(model)  # a missing or damaged model fails before the task files are read
    elif tokenizer is None:
        raise EvaluationInputError("A tokenizer is required when `model` is a model object (tokenizer=...).")
    includes = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    names = [t for t in tasks if isinstance(t, str)]
    loaded = {t.name: t for t in find_tasks(names, includes, allow_code=allow_code)} if names else {}
    resolved = [t for t in tasks if isinstance(t, Task)] + list(loaded.values())
    for task in resolved:
        task.validate(task.effective_num_fewshot(num_fewshot))
    needs_lm = any(OUTPUT_TYPES[t.output_type].needs_causal_lm for t in resolved if t.output_type in OUTPUT_TYPES)
    source = None
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    if is_path:
        model_name = str(model)
        model, loaded_tokenizer, source = load_model(model, add_bos_token=add_bos, causal=needs_lm)
        tokenizer = tokenizer or loaded_tokenizer
    elif needs_lm and not is_causal_lm(model):
        raise TaskError(
            f"{type(model).__name__} is not a causal LM; loglikelihood / generate_until tasks need one (e.g. *ForCausalLM)."
        )
    if not is_path:
        _check_tokenizer(tokenizer, "tokenizer")
    # A 4-bit model computes in its compute dtype on every CPU (bitsandbytes' fused CPU kernel is bf16).
    bnb_path = pin_bnb_cpu_path(model)
    torch.manual_seed(seed)
    cache = None
    # With the cache off nothing is written anywhere: the memo then lives for this call only.
    memo = ContentHashMemo(None if cache_dir is False else (cache_dir or default_cache_dir()))
    hashing_started = time.perf_counter()
    identity = model_identity(model, tokenizer, source, memo=memo, add_bos_token=add_bos, bnb_cpu_path=bnb_path)
    memo.save()
    identity_cost = {"files_hashed": memo.hashed, "seconds": round(time.perf_counter() - hashing_started, 3)}
    if cache_dir is not False:
        cache = ResultCache(cache_dir or default_cache_dir(), identity)
    scorer = CausalLMScorer(
        model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens, cache=cache, progress=progress,
        add_bos_token=add_bos, seed=seed,
    )
    config = {
        "model": model_name,
        "model_identity": identity,
        "batch_size": batch_size,
        "max_batch_tokens": max_batch_tokens,
        "add_bos_token": add_bos,
        "bnb_cpu_path": bnb_path,
        "model_identity_cost": identity_cost,
    }
    results, records = evaluate_tasks(resolved, scorer, num_fewshot=num_fewshot, limit=limit, seed=seed, config=config)
    results["config"]["cache_hits"] = cache.hits if cache is not None else 0
    results["config"]["warnings"] = list(getattr(scorer, "warnings", []))
    return (results, records) if return_records else results


from .encoder.harness import load_encoder  # noqa: E402  registers the encoder output types
