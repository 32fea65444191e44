"""Running tasks: model loading and checks, the ``evaluate`` entry point.

Each task is run by its output type (:mod:`.output_types`); other evaluators (e.g. encoder n-way
k-shot) register theirs there and reuse :func:`evaluate_tasks` with their own backend.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_check import CheckpointError, check_model_dir
from ..quantization import pin_bnb_cpu_path
from ..safe_paths import blocking_parent
from .cache import ContentHashMemo, ResultCache, default_cache_dir, model_identity
from .catalogue import find_tasks
from .metrics import get_metric
from .output_types import (  # noqa: F401  (OutputType, register_output_type re-exported)
    OUTPUT_TYPES,
    OutputType,
    metric_names,
    register_output_type,
    task_higher_is_better,
    task_scores,
)
from .results import build_results
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
        for name in metric_names(task):
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
        scores = task_scores(task, recs)
        summaries.append(
            {
                "name": task.name,
                "scores": scores,
                "config": {**task.config.to_dict(), "num_fewshot": k},
                "version": task.version,
                "num_fewshot": k,
                "higher_is_better": task_higher_is_better(task),
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
