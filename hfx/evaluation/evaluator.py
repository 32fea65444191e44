"""Running tasks: model loading and checks, the ``evaluate`` entry point.

Each task is run by its output type (:mod:`.output_types`); other evaluators (e.g. encoder n-way
k-shot) register theirs there and reuse :func:`evaluate_tasks` with their own backend.

Names may be tasks, tags or groups (:class:`~.groups.GroupNode` trees from the catalogue). Every
leaf task is prepared (documents, templates, few-shot pool) before the model is loaded, and every
task or group that cannot run is reported in one error, or, with ``skip_unsupported``, left out and
listed in ``results["skipped"]``. A leaf under several groups runs once.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_check import CheckpointError, check_model_dir
from ..quantization import pin_bnb_cpu_path
from ..safe_paths import blocking_parent
from .cache import ContentHashMemo, ResultCache, default_cache_dir, model_identity
from .catalogue import TaskIndex
from .groups import GroupNode, TaskRef
from .metrics import BOOTSTRAP_ITERS, get_metric
from .output_types import (  # noqa: F401  (OutputType, register_output_type re-exported)
    OUTPUT_TYPES,
    OutputType,
    metric_names,
    register_output_type,
    reported_metrics,
    task_higher_is_better,
    task_scores,
)
from .results import build_results, group_leaves, groups_preorder
from .scorer import CausalLMScorer, is_causal_lm
from .tasks import Task, TaskError

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
    bootstrap_iters: int = BOOTSTRAP_ITERS,
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
    if not _is_int(bootstrap_iters) or bootstrap_iters < 0:
        raise EvaluationInputError(f"bootstrap_iters must be an integer >= 0 (0: no bootstrap stderr), "
                                   f"got {bootstrap_iters!r}.")


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


# -- planning: names to trees, every leaf prepared, every refusal collected --------------------
@dataclass
class Plan:
    """What a run evaluates, decided before the model is loaded.

    ``roots``: what was asked, in order (group trees and tasks); ``tasks``: each leaf once, in
    lm-eval's order; ``prepared``: per task ``(k, docs, n_original, contexts)``; ``refused``: every
    task, group or name that cannot run, with why; ``skipped``: what the results report as skipped.
    """

    roots: list = field(default_factory=list)
    tasks: dict[str, Task] = field(default_factory=dict)
    prepared: dict[str, tuple] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a group aggregate no member reports

    @property
    def groups(self) -> list[GroupNode]:
        return [r for r in self.roots if isinstance(r, GroupNode)]


def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _resolve_name(index: TaskIndex, name: str) -> list:
    """The nodes a name stands for: a group tree, a task, or a tag's tasks."""
    if hasattr(index, "resolve"):
        return list(index.resolve([name]))
    return [TaskRef(n) for n in index.expand([name])]


def _load_ref(index: TaskIndex, ref: TaskRef) -> Task:
    if hasattr(index, "resolve"):  # the catalogue that resolves groups also applies a group's inline overrides
        return Task(index.config(ref))
    return index.load(ref.name)


def _filter_names(task: Task) -> list[str]:
    if task.output_type == "generate_until":
        return [p.name for p in task.filters]
    return ["none"]


def _prepare(task: Task, num_fewshot, limit, seed) -> tuple:
    if task.output_type not in OUTPUT_TYPES:
        raise TaskError(
            f"Task {task.name!r}: output_type {task.output_type!r} has no evaluator; known: {sorted(OUTPUT_TYPES)}."
        )
    for name in metric_names(task):
        get_metric(name)
    k = task.effective_num_fewshot(num_fewshot)
    all_docs = task.eval_docs()
    docs = all_docs[:limit] if limit else all_docs
    task.validate(k, docs)
    return k, docs, len(all_docs), task.contexts(docs, k, seed)


def unreported_aggregates(group: GroupNode, tasks: dict[str, Task]) -> list[str]:
    """One line per ``aggregate_metric_list`` entry of ``group`` that none of its leaves reports.

    lm-eval 0.4.13 runs such a group and reports no value for that metric (19 of its bundled groups
    do, e.g. ``adr`` aggregates ``acc`` over bleu tasks), so hfx does the same and says why. A leaf
    whose metrics only running it tells (a ``process_results`` hook without ``metric_list``, a
    ``class:`` task) may report anything, so it counts as a provider.
    """
    leaves = list(dict.fromkeys(group_leaves(group)))
    reported = {n: reported_metrics(tasks[n]) for n in leaves}
    lines = []
    for agg in group.aggregate_metric_list or ():
        providers = [
            n for n in leaves
            if (reported[n] is None or agg.metric in reported[n])
            and (agg.filter_list is None or set(agg.filter_list) & set(_filter_names(tasks[n])))
        ]
        if not providers:
            where = "" if agg.filter_list is None else f" with filter {list(agg.filter_list)}"
            listing = "; ".join(
                f"{n}: {', '.join(f'{m},{f}' for f in _filter_names(tasks[n]) for m in sorted(reported[n] or ()))}"
                for n in leaves[:5]
            ) + (f"; and {len(leaves) - 5} more" if len(leaves) > 5 else "")
            lines.append(
                f"Group {group.name!r} ({group.source or 'group'}): aggregate_metric_list metric {agg.metric!r}{where} "
                f"is reported by none of its members ({listing or 'no members'}); the group gets no "
                f"{agg.metric!r} aggregate (as in lm-eval)."
            )
    return lines


def plan(
    items: Iterable,
    *,
    index: TaskIndex | None = None,
    include_path: Iterable = (),
    allow_code: bool = False,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = DEFAULT_FEWSHOT_SEED,
) -> Plan:
    """Resolve names (tasks, tags, groups), :class:`Task` objects and :class:`GroupNode` trees; prepare each leaf once.

    Nothing raises for a task that cannot run: it lands in ``Plan.refused`` with why, so that one
    error (or ``skip_unsupported``) covers them all. A group leaf is taken from the given
    :class:`Task` objects of that name first, else from the index.
    """
    result = Plan()
    given = {t.name: t for t in items if isinstance(t, Task)}
    needs_index = any(isinstance(t, (str, GroupNode, TaskRef)) for t in items)
    if index is None and needs_index:
        index = TaskIndex(include_path, allow_code=allow_code)
    for item in items:
        if isinstance(item, str):
            try:
                result.roots.extend(_resolve_name(index, item))
            except TaskError as exc:
                result.refused[item] = _message(exc)
        else:
            result.roots.append(item)
    refs: list[TaskRef | Task] = []
    for root in result.roots:
        refs.extend(root.task_refs() if isinstance(root, GroupNode) else [root])
    for ref in refs:
        name = ref.name
        if name in result.tasks or name in result.refused:
            continue
        try:
            if isinstance(ref, Task):
                task = ref
            elif name in given and not ref.overrides:
                task = given[name]
            else:
                task = _load_ref(index, ref)
            result.tasks[name] = task
            result.prepared[name] = _prepare(task, num_fewshot, limit, seed)
        except TaskError as exc:
            result.tasks.pop(name, None)
            result.refused[name] = _message(exc)
            continue
        overrides = ref.overrides if isinstance(ref, TaskRef) else None
        alias = task.config.task_alias or (overrides or {}).get("task_alias")
        if alias:
            result.aliases[name] = alias
    for group in groups_preorder(result.roots):
        missing = [n for n in dict.fromkeys(group_leaves(group)) if n not in result.tasks]
        if missing:
            result.skipped[group.name] = f"member(s) {', '.join(missing)} skipped; lm-eval's aggregate needs all"
            continue
        for line in unreported_aggregates(group, result.tasks):
            warnings.warn(line, stacklevel=3)
            result.warnings.append(line)
    return result


def _refusal_listing(refused: dict[str, str], shown: int = 10) -> str:
    """Every refused name; the reasons of the first ``shown`` (mmlu offline: 57 times the same hub error)."""
    items = list(refused.items())
    listing = "; ".join(f"{name}: {why}" for name, why in items[:shown])
    if len(items) > shown:
        listing += f"; and {len(items) - shown} more: {', '.join(name for name, _ in items[shown:])}"
    return listing


def settle(plan_: Plan, skip_unsupported: bool) -> None:
    """Raise one TaskError naming every refused task and group, or (``skip_unsupported``) mark them skipped."""
    if not plan_.refused:
        return
    listing = _refusal_listing(plan_.refused)
    if not skip_unsupported:
        if len(plan_.refused) == 1:  # one refusal keeps its own message
            ((name, why),) = plan_.refused.items()
            raise TaskError(why if repr(name) in why or name in why.split(":")[0] else f"{name}: {why}")
        hint = " (--skip-unsupported runs the rest)" if plan_.tasks else ""
        raise TaskError(f"{len(plan_.refused)} task(s)/group(s) cannot run{hint}: {listing}")
    if not plan_.tasks:
        raise TaskError(f"nothing left to run: every task was refused: {listing}")
    plan_.skipped = {**plan_.refused, **{k: v for k, v in plan_.skipped.items() if k not in plan_.refused}}
    plan_.refused = {}


# -- the entry point --------------------------------------------------------------------------
def _run_plan(plan_: Plan, backend: Any, *, limit, seed, config, skip_unsupported: bool,
              bootstrap_iters: int = BOOTSTRAP_ITERS) -> tuple[dict, dict]:
    started = time.time()
    for name, task in list(plan_.tasks.items()):  # backend checks: still before any task is scored
        check = OUTPUT_TYPES[task.output_type].check
        if check is None:
            continue
        try:
            check(task, plan_.prepared[name][1], backend)
        except TaskError as exc:
            plan_.refused[name] = _message(exc)
            del plan_.tasks[name]
    if plan_.refused:
        for group in groups_preorder(plan_.roots):
            missing = [n for n in dict.fromkeys(group_leaves(group)) if n in plan_.refused]
            if missing and group.name not in plan_.skipped:
                plan_.skipped[group.name] = f"member(s) {', '.join(missing)} skipped; lm-eval's aggregate needs all"
    settle(plan_, skip_unsupported)
    records, summaries = {}, []
    for name, task in plan_.tasks.items():
        k, docs, n_original, contexts = plan_.prepared[name]
        recs = OUTPUT_TYPES[task.output_type].run(task, docs, contexts, backend)
        records[name] = recs
        summaries.append(
            {
                "name": name,
                "alias": plan_.aliases.get(name),
                "scores": task_scores(task, recs, bootstrap_iters=bootstrap_iters),
                "config": {**task.config.to_dict(), "num_fewshot": k},
                "version": task.version,
                "num_fewshot": k,
                "higher_is_better": task_higher_is_better(task),
                "n_original": n_original,
                "n_effective": len(docs),
            }
        )
    run_config = {"limit": limit, "bootstrap_iters": bootstrap_iters, "random_seed": 0, "numpy_seed": 1234,
                  "torch_seed": seed, "fewshot_seed": seed}
    run_config.update(config or {})
    results = build_results(summaries, run_config, started, time.time(), groups=plan_.groups, skipped=plan_.skipped)
    return results, records


def evaluate_tasks(
    tasks: Sequence[Task | GroupNode | str],
    backend: Any,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = DEFAULT_FEWSHOT_SEED,
    config: dict | None = None,
    include_path: str | os.PathLike | Iterable[str | os.PathLike] = (),
    allow_code: bool = False,
    skip_unsupported: bool = False,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
) -> tuple[dict, dict[str, list[dict]]]:
    """Validate every task, then run them on ``backend``; returns (lm-eval-shaped results, per-task records).

    ``tasks`` may mix :class:`Task` objects, :class:`GroupNode` trees (their leaves taken from the
    given tasks by name, else from ``include_path``) and task/tag/group names.
    """
    check_arguments(num_fewshot=num_fewshot, limit=limit, seed=seed, bootstrap_iters=bootstrap_iters)
    includes = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    plan_ = plan(list(tasks), include_path=includes, allow_code=allow_code, num_fewshot=num_fewshot, limit=limit,
                 seed=seed)
    settle(plan_, skip_unsupported)
    return _run_plan(plan_, backend, limit=limit, seed=seed, config=config, skip_unsupported=skip_unsupported,
                     bootstrap_iters=bootstrap_iters)


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
    skip_unsupported: bool = False,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
):
    """Evaluate a causal LM (object or path/id) on tasks (task, tag or group names, :class:`Task` objects or
    :class:`GroupNode` trees).

    Arguments, the model folder (config, weight headers), task files and every task (unknown
    names, template fields, few-shot pool size, causal model) are checked before the model is
    loaded or run. ``cache_dir=False`` disables the result cache; ``None`` uses
    ``$HFX_EVAL_CACHE`` or ``~/.cache/hfx/eval``. ``add_bos_token`` is lm-eval's switch: ``None``
    keeps the tokenizer's default special tokens (lm-eval's default too); ``False`` suits models
    trained without special tokens around documents (hfx quickstart); ``add_special_tokens`` is
    the older name of the same switch. ``seed`` seeds the few-shot draws and, per request, sampling.
    Every task or group that cannot run is named in one :class:`TaskError` before the model loads;
    ``skip_unsupported=True`` runs the rest and lists the others in ``results["skipped"]`` (a group
    with a skipped member then reports no aggregate).
    ``bootstrap_iters`` is lm-eval's: resamples for the stderr of corpus metrics (perplexity, f1,
    bleu, ...; 0 reports none).
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
                    seed=seed, bootstrap_iters=bootstrap_iters)
    tasks = task_names(tasks)
    _check_cache_dir(cache_dir)
    is_path = isinstance(model, (str, os.PathLike))
    if is_path:
        check_model_path(model)  # a missing or damaged model fails before the task files are read
    elif tokenizer is None:
        raise EvaluationInputError("A tokenizer is required when `model` is a model object (tokenizer=...).")
    includes = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    plan_ = plan(tasks, include_path=includes, allow_code=allow_code, num_fewshot=num_fewshot, limit=limit, seed=seed)
    settle(plan_, skip_unsupported)
    resolved = list(plan_.tasks.values())
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
    results, records = _run_plan(plan_, scorer, limit=limit, seed=seed, config=config,
                                 skip_unsupported=skip_unsupported, bootstrap_iters=bootstrap_iters)
    results["config"]["cache_hits"] = cache.hits if cache is not None else 0
    results["config"]["warnings"] = plan_.warnings + list(getattr(scorer, "warnings", []))
    return (results, records) if return_records else results


from .encoder.harness import load_encoder  # noqa: E402  registers the encoder output types
