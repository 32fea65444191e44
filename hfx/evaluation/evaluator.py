"""Running tasks: model loading and checks, the ``evaluate`` entry point.

Each task is run by its output type (:mod:`.output_types`); other evaluators (e.g. encoder n-way
k-shot) register theirs there and reuse :func:`evaluate_tasks` with their own backend.

Names may be tasks, tags or groups (:class:`~.groups.GroupNode` trees from the catalogue). Every
leaf task is prepared (documents, templates, few-shot pool) before the model is loaded, and every
task or group that cannot run is reported in one error, or, with ``skip_unsupported``, left out and
listed in ``results["skipped"]``. A leaf under several groups runs once.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_check import CheckpointError, check_model_dir, is_seq2seq_checkpoint
from ..long_context import prepare_long_model
from ..quantization import pin_bnb_cpu_path
from ..safe_paths import blocking_parent
from .cache import ContentHashMemo, ResultCache, default_cache_dir, model_identity
from .catalogue import TaskIndex
from .chat import prompt_config, prompt_format
from .class_tasks import CLASS_OUTPUT_TYPE
from .groups import GroupNode, TaskRef
from .metrics import BOOTSTRAP_ITERS, get_metric
from .model_args import ModelArgs, check_adapter, check_dtype_on_device, parse_pairs, resolve_device
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
from .seq2seq import Seq2SeqScorer, is_seq2seq_lm, resolve_backend
from .tasks import Task, TaskError

DEFAULT_FEWSHOT_SEED = 1234
#: lm-eval's four seed slots (python ``random``, numpy, torch, few-shot) and their defaults
SEED_SLOTS = ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")
DEFAULT_SEEDS = (0, 1234, 1234, DEFAULT_FEWSHOT_SEED)


class EvaluationInputError(ValueError):
    """An argument of :func:`evaluate` (or ``hfx eval``) that cannot be used; raised before any model work."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_seeds(seed) -> tuple[int | None, int | None, int | None, int | None]:
    """lm-eval's ``--seed``: one integer for all four slots, or ``random,numpy,torch,fewshot`` (``None``: unset).

    Accepts an int, a comma-separated string or a sequence; three values take the last (few-shot)
    from the defaults, as lm-eval does.
    """
    if seed is None:
        return DEFAULT_SEEDS
    given = seed
    if isinstance(seed, str):
        seed = [part.strip() for part in seed.split(",")]
    elif _is_int(seed):
        seed = [seed]
    elif isinstance(seed, (list, tuple)):
        seed = list(seed)
    else:
        raise EvaluationInputError(f"seed must be an integer or 'random,numpy,torch,fewshot', got {given!r}.")
    values: list[int | None] = []
    for item in seed:
        if item is None or (isinstance(item, str) and item.lower() == "none"):
            values.append(None)
            continue
        try:
            number = int(item) if not isinstance(item, bool) and str(item).lstrip("+-").isdigit() else None
        except (TypeError, ValueError):
            number = None
        if number is None:
            raise EvaluationInputError(f"seed {given!r}: {item!r} is not an integer or None.")
        if not 0 <= number < 2**63:
            raise EvaluationInputError(f"seed must be an integer in [0, 2**63), got {number!r}.")
        values.append(number)
    if len(values) == 1:
        values *= 4
    elif len(values) == 3:
        values.append(DEFAULT_SEEDS[3])
    if len(values) != 4:
        raise EvaluationInputError(f"seed {given!r}: give one integer or four values random,numpy,torch,fewshot "
                                   f"(e.g. 0,1234,1234,1234; None leaves a slot unset), got {len(values)}.")
    if values[1] is not None and values[1] >= 2**32:
        raise EvaluationInputError(f"seed {given!r}: the numpy seed must be below 2**32, got {values[1]}.")
    return tuple(values)  # type: ignore[return-value]


def _check_limit(limit) -> None:
    if limit is None:
        return
    if isinstance(limit, float) and not isinstance(limit, bool):
        if 0 < limit < 1 or (limit >= 1 and limit.is_integer()):
            return
    elif _is_int(limit) and limit >= 1:
        return
    raise EvaluationInputError(f"limit must be an integer >= 1 (or None), got {limit!r}; or a fraction "
                               "0 < limit < 1 of each task's documents (as lm-eval).")


def doc_count(limit, n: int) -> int:
    """How many of a task's ``n`` documents ``limit`` keeps: lm-eval's ``ceil(n * fraction)``, or the first N."""
    if limit is None:
        return n
    if limit < 1:
        return int(math.ceil(n * limit))
    return min(int(limit), n)


def parse_samples(samples) -> dict[str, list[int]] | None:
    """lm-eval's ``--samples``: ``{task: [doc indices]}`` as a dict, a JSON string or the path of a JSON file."""
    if samples is None:
        return None
    given = samples
    if isinstance(samples, (str, os.PathLike)):
        text = str(samples).strip()
        if not text.startswith("{"):
            path = Path(text).expanduser()
            if not path.is_file():
                raise EvaluationInputError(f"samples {text!r} is neither a JSON object nor a JSON file "
                                           '(e.g. \'{"my_task": [0, 5, 7]}\').')
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise EvaluationInputError(f"samples file {str(path)!r} cannot be read: {exc}.") from None
        try:
            samples = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvaluationInputError(f"samples {str(given)[:80]!r} is not valid JSON: {exc.msg} "
                                       f"(line {exc.lineno}, column {exc.colno}).") from None
    if not isinstance(samples, dict) or not samples:
        raise EvaluationInputError(f"samples must map task names to lists of document indices, "
                                   f'e.g. {{"my_task": [0, 5, 7]}}, got {given!r}.')
    out = {}
    for task, indices in samples.items():
        if not isinstance(indices, list) or not indices or not all(_is_int(i) and i >= 0 for i in indices):
            raise EvaluationInputError(f"samples[{task!r}] must be a non-empty list of document indices "
                                       f"(integers >= 0), got {indices!r}.")
        out[str(task)] = indices
    return out


def check_arguments(
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | str | None = None,
    max_batch_tokens: int = 4096,
    seed=DEFAULT_FEWSHOT_SEED,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
    samples=None,
) -> None:
    """Raise :class:`EvaluationInputError` naming the first bad value (and what is valid)."""
    minimum = {"num_fewshot": 0, "batch_size": 1, "max_batch_tokens": 1}
    values = {"num_fewshot": num_fewshot, "batch_size": batch_size, "max_batch_tokens": max_batch_tokens}
    for name, value in values.items():
        if value is None and name != "max_batch_tokens":
            continue
        if name == "batch_size" and value == "auto":
            continue
        if not _is_int(value) or value < minimum[name]:
            optional = "" if name == "max_batch_tokens" else " (or None)"
            extra = "; or 'auto' (the budget that fits, found once)" if name == "batch_size" else ""
            raise EvaluationInputError(f"{name} must be an integer >= {minimum[name]}{optional}, got {value!r}{extra}.")
    _check_limit(limit)
    if limit is not None and samples is not None:
        raise EvaluationInputError("limit and samples both given: samples names the documents, limit counts "
                                   "them; give one (as lm-eval).")
    parse_seeds(seed)
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
def _load_config(path: str, hub_kwargs: dict | None = None):
    """The model's config, every failure as one :class:`CheckpointError` line."""
    from transformers import AutoConfig

    import hfx  # noqa: F401  (registers the hfx model type)

    try:
        return AutoConfig.from_pretrained(path, **(hub_kwargs or {}))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"--model {path}: its config cannot be used: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:397] + "..."


def _check_tokenizer(tokenizer, where: str) -> None:
    if not tokenizer.encode("the cat", add_special_tokens=False):
        raise CheckpointError(f"{where}: the tokenizer encodes text to no tokens (an empty vocabulary: was the "
                              "tokenizer saved with the model? tokenizer.save_pretrained(folder))")


def check_model_path(path: str | os.PathLike, hub_kwargs: dict | None = None):
    """Cheap checks of a model folder (config.json, weight headers, config values); hub ids pass to transformers.

    Returns the loaded config.
    """
    check_model_dir(path, what="--model")
    return _load_config(str(path), hub_kwargs)


def _check_causal_config(path: str, hub_kwargs: dict | None = None) -> None:
    from transformers import AutoModelForCausalLM

    config = _load_config(path, hub_kwargs)
    architectures = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if getattr(config, "is_encoder_decoder", False):
        raise TaskError(
            f"{path} is an encoder-decoder {config.model_type!r} model ({architectures or 'no architectures'}); "
            "backend=causal would load its decoder alone. Evaluate it with --model-args backend=seq2seq (or auto)."
        )
    # The Auto mapping also holds model types registered at run time (hfx, third parties).
    if type(config) not in AutoModelForCausalLM._model_mapping or (architectures and not causal_arch):
        raise TaskError(
            f"{path} is a {config.model_type!r} model ({architectures or 'no architectures'}), not a causal LM; "
            "loglikelihood / generate_until tasks need one (e.g. *ForCausalLM)."
        )


def _check_seq2seq_config(path: str, hub_kwargs: dict | None = None) -> None:
    config = _load_config(path, hub_kwargs)
    architectures = getattr(config, "architectures", None) or []
    if not is_seq2seq_checkpoint(config):
        kind = "an encoder-decoder model AutoModelForSeq2SeqLM cannot load" if getattr(
            config, "is_encoder_decoder", False) else "not an encoder-decoder (config.is_encoder_decoder is False)"
        raise TaskError(
            f"{path} is a {config.model_type!r} model ({architectures or 'no architectures'}), {kind}; "
            "backend=seq2seq needs an AutoModelForSeq2SeqLM checkpoint (T5, BART, hfx HfxForConditionalGeneration). "
            "Valid backends for this model: causal (or auto)."
        )


def load_tokenizer(path: str, *, add_bos_token: bool | None = None, hub_kwargs: dict | None = None):
    """The model's tokenizer with lm-eval's ``add_bos_token`` (cheap: loaded before the tasks are planned)."""
    from transformers import AutoTokenizer

    kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs, **(hub_kwargs or {}))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"--model {path}: its tokenizer cannot be loaded: {_one_line(exc)}") from None
    _check_tokenizer(tokenizer, f"--model {path}")
    return tokenizer


def load_model(
    model: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    add_bos_token: bool | None = None,
    causal: bool = True,
    model_args: ModelArgs | str | dict | None = None,
    device: str | None = None,
    tokenizer=None,
    backend: str = "causal",
):
    """``(model, tokenizer, source_path)`` from a local directory or hub id, checked first.

    The folder, its config and the headers of its weight files are checked (one-line
    :class:`~hfx.checkpoint_check.CheckpointError`), then that it is a causal LM (``causal=False``:
    an encoder with the head it was saved with). ``add_bos_token`` is passed to the tokenizer as
    lm-eval's ``HFLM`` does (a fast tokenizer then rebuilds its post-processor: BOS or nothing
    before the text, nothing after it). ``model_args`` (lm-eval's keys, :class:`ModelArgs`) choose
    dtype, revision, quantisation, attention, placement and a PEFT adapter (loaded on the base as
    lm-eval's ``peft=`` does); ``device`` is a resolved ``--device``. Without either the model
    loads in fp32 on CPU. ``backend="seq2seq"`` loads an encoder-decoder (``AutoModelForSeq2SeqLM``) instead.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    args = ModelArgs.parse(model_args)
    if dtype is not None and args.dtype is None:
        args = dataclasses.replace(args, dtype=str(dtype).removeprefix("torch."))
    path = str(model)
    hub = args.hub_kwargs()
    config = check_model_path(path, hub)
    if not causal:
        return load_encoder(path, attn_implementation=args.attn_implementation)
    if backend == "seq2seq":
        _check_seq2seq_config(path, hub)
    else:
        _check_causal_config(path, hub)
    adapter = check_adapter(args.peft, path, config) if args.peft is not None else None
    if tokenizer is None:
        tokenizer = load_tokenizer(path, add_bos_token=add_bos_token, hub_kwargs=hub)
    kwargs = args.from_pretrained_kwargs(device, config)
    try:
        auto_class = AutoModelForSeq2SeqLM if backend == "seq2seq" else AutoModelForCausalLM
        loaded = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise CheckpointError(f"--model {path}: the model cannot be loaded: {_one_line(exc)}") from None
    prepare_long_model(loaded)  # a convert-long checkpoint: its global token ids active
    if adapter is not None:
        loaded = _load_adapter(loaded, adapter, tokenizer, args)
    if device is not None and "device_map" not in kwargs and not args.quantized:
        loaded = loaded.to(device)
    return loaded, tokenizer, path if Path(path).is_dir() else None


def _load_adapter(base, adapter: Path, tokenizer, args: ModelArgs):
    """``PeftModel.from_pretrained`` on the loaded base, as lm-eval's ``peft=`` (embeddings resized to the tokenizer)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise EvaluationInputError(f"--model-args peft={args.peft} needs the peft package (pip install peft).") from None
    if base.config.vocab_size != len(tokenizer):  # an adapter trained with added tokens (lm-eval resizes too)
        base.resize_token_embeddings(len(tokenizer))
    try:
        return PeftModel.from_pretrained(base, str(adapter), **({"revision": args.revision} if args.revision else {}))
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"--model-args peft={args.peft}: the adapter cannot be loaded on this base: "
                              f"{_one_line(exc)}") from None


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
    doc_ids: dict[str, list[int]] = field(default_factory=dict)  # dataset index of each document chosen by samples

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


def _select_docs(task: Task, all_docs: list, limit, indices: list[int] | None) -> list:
    """The documents a run scores: ``indices`` (lm-eval's ``--samples``: in dataset order), else ``limit``'s share."""
    if indices is None:
        return all_docs[:doc_count(limit, len(all_docs))]
    bad = sorted({i for i in indices if i >= len(all_docs)})
    if bad:
        raise EvaluationInputError(f"samples[{task.name!r}]: document index {bad[0]} is out of range: the task has "
                                   f"{len(all_docs)} documents (indices 0..{len(all_docs) - 1}).")
    if task.output_type == CLASS_OUTPUT_TYPE:
        raise EvaluationInputError(f"samples[{task.name!r}]: a class: task builds its own requests from its first "
                                   "documents; use limit for it.")
    chosen = set(indices)
    return [doc for i, doc in enumerate(all_docs) if i in chosen]


def _prepare(task: Task, num_fewshot, limit, seed, indices: list[int] | None = None, prompt_format=None) -> tuple:
    if task.output_type not in OUTPUT_TYPES:
        raise TaskError(
            f"Task {task.name!r}: output_type {task.output_type!r} has no evaluator; known: {sorted(OUTPUT_TYPES)}."
        )
    for name in metric_names(task):
        get_metric(name)
    k = task.effective_num_fewshot(num_fewshot)
    all_docs = task.eval_docs()
    docs = _select_docs(task, all_docs, limit, indices)
    task.validate(k, docs)
    if prompt_format is None:
        return k, docs, len(all_docs), task.contexts(docs, k, seed)
    return k, docs, len(all_docs), task.contexts(docs, k, seed, prompt_format=prompt_format)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_gen_kwargs(gen_kwargs: dict | None, what: str = "gen_kwargs") -> None:
    """The types of the generation options hfx and ``generate`` read, as one :class:`EvaluationInputError` line.

    A key that is neither lm-eval's (``until``, ``max_gen_toks``) nor a ``GenerationConfig``
    attribute would make ``generate`` fail after the model has loaded: it is refused here.
    """
    if gen_kwargs:
        import difflib

        from transformers import GenerationConfig

        known = set(GenerationConfig().to_dict()) | {"until", "max_gen_toks", "max_new_tokens"}
        for key in gen_kwargs:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise EvaluationInputError(f"{what}: unknown generation option {key!r}{hint}; give lm-eval's until / "
                                           "max_gen_toks or a transformers GenerationConfig attribute (do_sample, "
                                           "temperature, top_p, top_k, num_beams, repetition_penalty, ...).")
    for key, value in (gen_kwargs or {}).items():
        problem = None
        if value is None and key not in ("max_gen_toks", "max_new_tokens", "num_beams"):
            continue  # not set: generate's own default
        if key in ("max_gen_toks", "max_new_tokens", "num_beams"):
            if not _is_int(value) or value < 1:
                problem = "a positive integer"
        elif key == "until":
            if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
                problem = "a string or a list of strings"
        elif key == "do_sample":
            if not isinstance(value, bool):
                problem = "True or False"
        elif key in ("temperature", "top_p"):
            if not _is_number(value) or value < 0 or (key == "top_p" and value > 1):
                problem = "a number >= 0" if key == "temperature" else "a number in [0, 1]"
        elif key == "top_k":
            if not _is_int(value) or value < 0:
                problem = "an integer >= 0"
        if problem is not None:
            raise EvaluationInputError(f"{what}: {key} must be {problem}, got {value!r}.")


def _max_gen_toks(task: Task) -> int:
    kwargs = task.config.generation_kwargs or {}
    return kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256))


def check_generation_room(plan_: Plan, max_length: int, where: str) -> None:
    """Every generate_until task's max_gen_toks below the model's ``max_length`` (room for the prompt)."""
    for name, task in plan_.tasks.items():
        if task.output_type != "generate_until":
            continue
        check_gen_kwargs(task.config.generation_kwargs, f"task {name!r} generation_kwargs")
        wanted = _max_gen_toks(task)
        if wanted >= max_length:
            raise EvaluationInputError(f"task {name!r}: max_gen_toks={wanted} leaves no room for the prompt: the "
                                       f"model's max_length is {max_length} ({where}); give --gen-kwargs "
                                       f"max_gen_toks below it.")


def with_gen_kwargs(task: Task, gen_kwargs: dict | None) -> Task:
    """A copy of a generate_until ``task`` whose generation_kwargs are updated by ``gen_kwargs`` (lm-eval's --gen_kwargs)."""
    if not gen_kwargs or task.output_type != "generate_until":
        return task
    check_gen_kwargs(gen_kwargs)
    merged = {**(task.config.generation_kwargs or {}), **gen_kwargs}
    if isinstance(merged.get("until"), str):
        merged["until"] = [merged["until"]]
    out = copy.copy(task)
    out.config = dataclasses.replace(task.config, generation_kwargs=merged)
    return out


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
    limit: int | float | None = None,
    seed: int | None = DEFAULT_FEWSHOT_SEED,
    samples: dict[str, list[int]] | None = None,
    prompt_format=None,
    gen_kwargs: dict | None = None,
) -> Plan:
    """Resolve names (tasks, tags, groups), :class:`Task` objects and :class:`GroupNode` trees; prepare each leaf once.

    Nothing raises for a task that cannot run: it lands in ``Plan.refused`` with why, so that one
    error (or ``skip_unsupported``) covers them all. A group leaf is taken from the given
    :class:`Task` objects of that name first, else from the index. ``seed`` is the few-shot seed;
    ``samples`` (``{task: [doc indices]}``) picks documents instead of ``limit``, and an index
    past a task's end or a task name nothing evaluates is an :class:`EvaluationInputError`;
    ``prompt_format`` (from :func:`hfx.evaluation.chat.prompt_format`) renders chat prompts;
    ``gen_kwargs`` updates every generate_until task's generation_kwargs.
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
            task = with_gen_kwargs(task, gen_kwargs)
            result.tasks[name] = task
            indices = samples.get(name) if samples is not None else None
            result.prepared[name] = _prepare(task, num_fewshot, limit, seed, indices, prompt_format)
            if indices is not None:
                result.doc_ids[name] = sorted(set(indices))
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
    if samples is not None:
        unknown = [n for n in samples if n not in result.tasks and n not in result.refused]
        if unknown:
            raise EvaluationInputError(f"samples names {', '.join(map(repr, unknown))}, which this run does not "
                                       f"evaluate; it evaluates: {', '.join(result.tasks) or 'nothing'}.")
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
              bootstrap_iters: int = BOOTSTRAP_ITERS, predict_only: bool = False) -> tuple[dict, dict]:
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
        if name in plan_.doc_ids:  # a document chosen by samples keeps its dataset index, as lm-eval logs it
            for record in recs:
                record["doc_id"] = plan_.doc_ids[name][record["doc_id"]]
        records[name] = recs
        task_config = {**task.config.to_dict(), "num_fewshot": k}
        if predict_only:
            # lm-eval's bypass metric: no metric is computed; generate_until reports its 999 placeholder,
            # the log-likelihood types report nothing (their process_results knows no bypass)
            generated = task.output_type == "generate_until"
            for record in recs:
                record["metrics"] = {"bypass": None} if generated else {}
            scores = {("bypass", f): (999, "N/A") for f in dict.fromkeys(r.get("filter", "none") for r in recs)} \
                if generated else {}
            directions = {"bypass": True}
            task_config["metric_list"] = [{"metric": "bypass"}]
        else:
            scores, directions = task_scores(task, recs, bootstrap_iters=bootstrap_iters), task_higher_is_better(task)
        summaries.append(
            {
                "name": name,
                "alias": plan_.aliases.get(name),
                "scores": scores,
                "config": task_config,
                "version": task.version,
                "num_fewshot": k,
                "higher_is_better": directions,
                "n_original": n_original,
                "n_effective": len(docs),
            }
        )
    seeds = parse_seeds(seed)
    run_config = {"limit": limit, "bootstrap_iters": bootstrap_iters, **dict(zip(SEED_SLOTS, seeds))}
    run_config.update(config or {})
    results = build_results(summaries, run_config, started, time.time(), groups=plan_.groups, skipped=plan_.skipped)
    return results, records


def evaluate_tasks(
    tasks: Sequence[Task | GroupNode | str],
    backend: Any,
    *,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    seed=DEFAULT_FEWSHOT_SEED,
    config: dict | None = None,
    include_path: str | os.PathLike | Iterable[str | os.PathLike] = (),
    allow_code: bool = False,
    skip_unsupported: bool = False,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
    samples=None,
    predict_only: bool = False,
) -> tuple[dict, dict[str, list[dict]]]:
    """Validate every task, then run them on ``backend``; returns (lm-eval-shaped results, per-task records).

    ``tasks`` may mix :class:`Task` objects, :class:`GroupNode` trees (their leaves taken from the
    given tasks by name, else from ``include_path``) and task/tag/group names. ``seed``, ``limit``,
    ``samples`` and ``predict_only`` as in :func:`evaluate`.
    """
    check_arguments(num_fewshot=num_fewshot, limit=limit, seed=seed, bootstrap_iters=bootstrap_iters,
                    samples=samples)
    samples = parse_samples(samples)
    includes = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    plan_ = plan(list(tasks), include_path=includes, allow_code=allow_code, num_fewshot=num_fewshot, limit=limit,
                 seed=parse_seeds(seed)[3], samples=samples)
    settle(plan_, skip_unsupported)
    return _run_plan(plan_, backend, limit=limit, seed=seed, config=config, skip_unsupported=skip_unsupported,
                     bootstrap_iters=bootstrap_iters, predict_only=predict_only)


def _resolve_model(model, args: ModelArgs):
    """The model given by ``model`` and/or ``model_args`` ``pretrained=``: one of them, or both agreeing."""
    if args.pretrained is None:
        if model is None:
            raise EvaluationInputError("no model: give a model (a folder, hub id or model object) or "
                                       "model_args pretrained=...")
        return model
    if model is None:
        return args.pretrained
    if not isinstance(model, (str, os.PathLike)):
        raise EvaluationInputError(f"model_args pretrained={args.pretrained} and a model object were both given; "
                                   "give one.")
    same = str(model) == args.pretrained or (
        Path(model).exists() and Path(args.pretrained).exists()
        and Path(model).resolve() == Path(args.pretrained).resolve())
    if not same:
        raise EvaluationInputError(f"--model {model} and --model-args pretrained={args.pretrained} disagree; "
                                   "give the model once.")
    return model


#: model_args keys that only a load from a folder or hub id can honour
_LOAD_KEYS = ("dtype", "revision", "trust_remote_code", "peft", "device_map", "parallelize", "attn_implementation",
              "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype",
              "bnb_4bit_use_double_quant")


def _check_placement(args: ModelArgs, device: str | None, device_given: bool) -> None:
    if args.placement is not None and device_given:
        raise EvaluationInputError(f"device={device!r} and model_args device_map={args.placement!r} both place the "
                                   "model; give one (device_map / parallelize=True spread it, device puts it whole "
                                   "on one device).")


def _process_group(device: str | None, placement):
    """The data-parallel group (``hfx.evaluation.distributed``); one process when not launched by torchrun/accelerate."""
    from .distributed import process_group

    return process_group(device, device_map=placement)


def _chat_format(tokenizer, apply_chat_template, fewshot_as_multiturn, system_instruction):
    if not apply_chat_template and not fewshot_as_multiturn and system_instruction is None:
        return None
    return prompt_format(tokenizer, apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
                         system_instruction=system_instruction)


def placement_types(model) -> list[str]:
    """The device types the loaded ``model`` computes on: its first parameter's, and every one its
    ``hf_device_map`` (device_map / parallelize) names (an integer is a CUDA index)."""
    found = set()
    first = _device_of(model)
    if first is not None:
        found.add(torch.device(first).type)
    for where in (getattr(model, "hf_device_map", None) or {}).values():
        if isinstance(where, int) and not isinstance(where, bool):
            found.add("cuda")
        elif isinstance(where, torch.device):
            found.add(where.type)
        elif isinstance(where, str):
            try:
                found.add(torch.device(where).type)
            except (RuntimeError, ValueError):  # accelerate's "disk" offload
                found.add(where.split(":")[0])
    return sorted(found)


def _identity_extras(identity: str, *, adapter: Path | None, memo: ContentHashMemo, devices, max_length) -> str:
    """Fold what the base model's identity does not see into the cache key: the adapter's files, the device
    types the model computes on (a GPU's kernels round differently from the CPU's; a CPU-only model adds
    nothing, so CPU caches keep their key), an explicit max_length (left truncation)."""
    extras = []
    if adapter is not None:
        from .cache import identity_files

        extras += [f"adapter:{f.name}:{memo.hash(f)}" for f in identity_files(adapter)]
    devices = [d for d in (devices or ()) if d != "cpu"] and list(devices)
    if devices:
        extras.append(f"device:{','.join(devices)}")
    if max_length is not None:
        extras.append(f"max_length:{max_length}")
    if not extras:
        return identity
    return hashlib.blake2b("\n".join([identity, *extras]).encode(), digest_size=16).hexdigest()


def print_prompts(plan_: Plan, stream=None) -> None:
    """lm-eval's ``--write_out``: the first document's prompt(s) and target of every task."""
    stream = stream or sys.stdout
    for name, task in plan_.tasks.items():
        k, docs, _, contexts = plan_.prepared[name]
        if not docs:
            continue
        task.doc_index = 0
        try:
            target = task.doc_to_target(docs[0]) if task.output_type != "loglikelihood_rolling" else None
            choices = task.doc_to_choice(docs[0]) if task.config.doc_to_choice is not None else None
        except (TaskError, AttributeError, TypeError):
            target = choices = None
        finally:
            task.doc_index = None
        context = contexts[0]
        prompts = context if isinstance(context, list) else [context]
        print(f"Task: {name}; document 0 ({task.output_type}, {k}-shot); prompt (from the next line):", file=stream)
        for prompt in prompts:
            print(prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False), file=stream)
            print("(end of prompt)", file=stream)
        if choices is not None:
            print(f"choices: {json.dumps(choices, ensure_ascii=False)}", file=stream)
        if target is not None:
            print(f"target: {json.dumps(target, ensure_ascii=False, default=str)}", file=stream)


def evaluate(
    model=None,
    tasks: str | Iterable[str | Task] = (),
    *,
    num_fewshot: int | None = None,
    tokenizer=None,
    include_path: str | os.PathLike | Iterable[str | os.PathLike] = (),
    batch_size: int | str | None = None,
    max_batch_tokens: int = 4096,
    limit: int | float | None = None,
    seed=None,
    allow_code: bool = False,
    cache_dir: str | os.PathLike | None | bool = None,
    progress: bool = True,
    return_records: bool = False,
    add_bos_token: bool | None = None,
    add_special_tokens: bool | None = None,
    skip_unsupported: bool = False,
    bootstrap_iters: int = BOOTSTRAP_ITERS,
    model_args: str | dict | ModelArgs | None = None,
    device: str | None = None,
    samples: dict | str | os.PathLike | None = None,
    predict_only: bool = False,
    gen_kwargs: str | dict | None = None,
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool | None = None,
    system_instruction: str | None = None,
    write_out: bool = False,
):
    """Evaluate a causal LM (object or path/id) on tasks (task, tag or group names, :class:`Task` objects or
    :class:`GroupNode` trees).

    Arguments, the model folder (config, weight headers), task files and every task (unknown
    names, template fields, few-shot pool size, causal model) are checked before the model is
    loaded or run. ``cache_dir=False`` disables the result cache; ``None`` uses
    ``$HFX_EVAL_CACHE`` or ``~/.cache/hfx/eval``. ``add_bos_token`` is lm-eval's switch: ``None``
    keeps the tokenizer's default special tokens (lm-eval's default too); ``False`` suits models
    trained without special tokens around documents (hfx quickstart); ``add_special_tokens`` is
    the older name of the same switch.
    Every task or group that cannot run is named in one :class:`TaskError` before the model loads;
    ``skip_unsupported=True`` runs the rest and lists the others in ``results["skipped"]`` (a group
    with a skipped member then reports no aggregate).
    ``bootstrap_iters`` is lm-eval's: resamples for the stderr of corpus metrics (perplexity, f1,
    bleu, ...; 0 reports none).

    lm-eval's run options: ``model_args`` (``"dtype=bfloat16,peft=runs/x/adapter"``, a dict, or
    :class:`~.model_args.ModelArgs`; ``pretrained=`` may stand for ``model``), ``device``
    (cpu, cuda, cuda:N, mps, auto; default CPU), ``batch_size="auto"``, ``limit`` as a count or a
    fraction, ``samples`` (``{task: [doc indices]}``, a JSON string or file), ``predict_only``
    (records kept, lm-eval's ``bypass`` placeholder instead of metrics), ``gen_kwargs`` (merged into
    every generate_until task's generation_kwargs), ``seed`` (one int for lm-eval's four slots, or
    ``"random,numpy,torch,fewshot"``; default ``0,1234,1234,1234``), ``apply_chat_template`` /
    ``fewshot_as_multiturn`` (default: on with a chat template) / ``system_instruction``, and
    ``write_out`` (print every task's first prompt).
    Returns the lm-eval-shaped results dict (and the per-task records with ``return_records``).
    """
    # -- every argument, before anything is read ---------------------------------------------
    args = ModelArgs.parse(model_args)
    if add_special_tokens is not None and add_bos_token is not None and add_special_tokens != add_bos_token:
        raise EvaluationInputError(
            f"add_bos_token={add_bos_token!r} and add_special_tokens={add_special_tokens!r} disagree; "
            "they are the same switch, give one."
        )
    add_bos = add_bos_token if add_bos_token is not None else add_special_tokens
    if add_bos is not None and not isinstance(add_bos, bool):
        raise EvaluationInputError(f"add_bos_token must be True, False or None, got {add_bos!r}.")
    if args.add_bos_token is not None:
        if add_bos is not None and add_bos != args.add_bos_token:
            raise EvaluationInputError(f"add_bos_token={add_bos!r} and model_args add_bos_token={args.add_bos_token!r} "
                                       "disagree; they are the same setting, give one.")
        add_bos = args.add_bos_token
    check_arguments(num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                    seed=seed, bootstrap_iters=bootstrap_iters, samples=samples)
    seeds = parse_seeds(seed)
    samples = parse_samples(samples)
    gen = parse_pairs(gen_kwargs, "gen_kwargs") or None
    check_gen_kwargs(gen)
    if system_instruction is not None and not isinstance(system_instruction, str):
        raise EvaluationInputError(f"system_instruction must be a string, got {system_instruction!r}.")
    if fewshot_as_multiturn is None:  # lm-eval's CLI: on whenever a chat template is applied
        fewshot_as_multiturn = bool(apply_chat_template)
    model = _resolve_model(model, args)
    tasks = task_names(tasks)
    _check_cache_dir(cache_dir)
    is_path = isinstance(model, (str, os.PathLike))
    if not is_path:
        unusable = [k for k in _LOAD_KEYS if getattr(args, k) is not None]
        if unusable:
            raise EvaluationInputError(f"model_args {', '.join(unusable)} choose how a model is loaded; the model "
                                       "given is already loaded (pass its folder or hub id instead).")
        if tokenizer is None:
            raise EvaluationInputError("A tokenizer is required when `model` is a model object (tokenizer=...).")
    device_given = device is not None
    device = resolve_device(device)
    _check_placement(args, device, device_given)
    source = adapter = config_ = None
    if is_path:
        config_ = check_model_path(model, args.hub_kwargs())  # a missing or damaged model fails before the tasks
        args.attention_kwargs(config_)  # and a long-context backend that is not installed
        if args.peft is not None:
            adapter = check_adapter(args.peft, model, config_)
        if not args.quantized:
            check_dtype_on_device(args.torch_dtype(config_), device)
    group = _process_group(device or (None if is_path else _device_of(model)), args.placement)
    if group is not None and group.device is not None and group.world_size > 1:
        device = str(group.device)  # each data-parallel rank on its own GPU (cuda:LOCAL_RANK), or the CPU
    if not is_path and device is not None and _device_of(model) is not None:
        check_dtype_on_device(next(model.parameters()).dtype, device)
    # lm-eval's simple_evaluate seeds python random, numpy and torch before it builds the tasks (a class: task
    # or a process_docs hook drawing from the global generators sees these states); None leaves one unset
    _set_seeds(seeds)
    # the tokenizer is cheap and chat prompts need it: loaded before the tasks are planned
    user_tokenizer = tokenizer is not None
    chat = bool(apply_chat_template or fewshot_as_multiturn or system_instruction is not None)
    if is_path and tokenizer is None:
        tokenizer = _early_tokenizer(model, add_bos, args, needed=chat)
    if not is_path and chat:  # chat prompts are rendered by it: checked before the tasks
        _check_tokenizer(tokenizer, "tokenizer")
    fmt = _chat_format(tokenizer, apply_chat_template, fewshot_as_multiturn, system_instruction)
    includes = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    plan_ = plan(tasks, include_path=includes, allow_code=allow_code, num_fewshot=num_fewshot, limit=limit,
                 seed=seeds[3], samples=samples, prompt_format=fmt, gen_kwargs=gen)
    settle(plan_, skip_unsupported)
    if not is_path and not chat:  # a task that cannot run is named before the tokenizer is tried
        _check_tokenizer(tokenizer, "tokenizer")
    if write_out and (group is None or group.is_main):
        print_prompts(plan_)
    backend_name = resolve_backend(args.backend, config_ if config_ is not None else getattr(model, "config", None))
    seq2seq = backend_name == "seq2seq"
    # an encoder-decoder's prompt goes to the encoder whole: max_gen_toks takes no room from it
    if config_ is not None and not seq2seq:  # the context length the scorer will use, from the config: before the weights load
        from types import SimpleNamespace

        from .scorer import resolve_max_length

        length = args.max_length or resolve_max_length(SimpleNamespace(config=config_), tokenizer)
        check_generation_room(plan_, length, "--model-args max_length" if args.max_length else "from its config")
    resolved = list(plan_.tasks.values())
    needs_lm = any(OUTPUT_TYPES[t.output_type].needs_causal_lm for t in resolved if t.output_type in OUTPUT_TYPES)
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
    if is_path:
        model_name = str(model)
        model, loaded_tokenizer, source = load_model(model, add_bos_token=add_bos, causal=needs_lm, model_args=args,
                                                     device=device, tokenizer=tokenizer if needs_lm else None,
                                                     backend=backend_name)
        # an encoder comes with the tokenizer it was saved with
        tokenizer = tokenizer if user_tokenizer or (needs_lm and tokenizer is not None) else loaded_tokenizer
    elif needs_lm and seq2seq and not is_seq2seq_lm(model):
        raise TaskError(f"{type(model).__name__} is not an encoder-decoder LM; backend=seq2seq needs one "
                        "(e.g. *ForConditionalGeneration), backend=causal a causal LM.")
    elif needs_lm and not seq2seq and not is_causal_lm(model):
        raise TaskError(
            f"{type(model).__name__} is not a causal LM; loglikelihood / generate_until tasks need one (e.g. *ForCausalLM)."
        )
    elif device is not None and not getattr(model, "hf_device_map", None):
        model = model.to(device)
    if not is_path:  # a convert-long model object: its global token ids active, or a warning that it runs dense
        prepare_long_model(model, warn_dense=True)
    # A 4-bit model computes in its compute dtype on every CPU (bitsandbytes' fused CPU kernel is bf16).
    bnb_path = pin_bnb_cpu_path(model)
    cache = None
    # With the cache off nothing is written anywhere: the memo then lives for this call only.
    memo = ContentHashMemo(None if cache_dir is False else (cache_dir or default_cache_dir()))
    hashing_started = time.perf_counter()
    identity = model_identity(model, tokenizer, source, memo=memo, add_bos_token=add_bos, bnb_cpu_path=bnb_path)
    identity = _identity_extras(identity, adapter=adapter, memo=memo, devices=placement_types(model),
                                max_length=args.max_length)
    memo.save()
    identity_cost = {"files_hashed": memo.hashed, "seconds": round(time.perf_counter() - hashing_started, 3)}
    if cache_dir is not False:
        cache = ResultCache(cache_dir or default_cache_dir(), identity)
    scorer_class = Seq2SeqScorer if seq2seq and needs_lm else CausalLMScorer
    scorer = scorer_class(
        model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens, cache=cache, progress=progress,
        add_bos_token=add_bos, seed=seeds[2],  # the raw torch slot: None keys sampled generations apart from 1234
        max_length=args.max_length,
    )
    if not seq2seq:
        check_generation_room(plan_, scorer.max_length, "--model-args max_length" if args.max_length else
                              "from its config")
    backend = scorer
    world_size = 1 if group is None else group.world_size
    if world_size > 1:
        from .distributed import DataParallelScorer

        backend = DataParallelScorer(scorer, group)
    model_device = str(getattr(scorer, "device", device or "cpu"))
    config = {
        "model": model_name,
        "model_args": args.given(),
        "backend": backend_name,
        "model_identity": identity,
        "batch_size": batch_size,
        "max_batch_tokens": max_batch_tokens,
        "device": model_device,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "add_bos_token": add_bos,
        "bnb_cpu_path": bnb_path,
        "model_identity_cost": identity_cost,
        "gen_kwargs": gen,
        "samples": samples,
        "predict_only": predict_only,
        "world_size": world_size,
        **prompt_config(fmt),  # lm-eval's record of prompt formatting: template, system instruction, their sha256
    }
    try:
        results, records = _run_plan(plan_, backend, limit=limit, seed=seeds, config=config,
                                     skip_unsupported=skip_unsupported, bootstrap_iters=bootstrap_iters,
                                     predict_only=predict_only)
    except ValueError as exc:  # generation's own max_gen_toks check (a class: task's requests): bad input
        if type(exc) is ValueError and str(exc).startswith("max_gen_toks="):
            raise EvaluationInputError(_one_line(exc)) from None
        raise
    batch_info = getattr(scorer, "batch_info", None)
    if batch_info is None and batch_size == "auto":  # every request came from the cache (or none was scored)
        batch_info = {"mode": "auto", "max_batch_tokens": None, "rows": None,
                      "note": "nothing was scored in this run, so no budget was probed"}
    if batch_info:
        results["config"]["batch_info"] = batch_info
    for key in ("chat_template", "chat_template_sha", "system_instruction", "system_instruction_sha",
                "fewshot_as_multiturn"):  # where lm-eval's results file has them
        results[key] = results["config"][key]
    results["config"]["cache_hits"] = cache.hits if cache is not None else 0
    results["config"]["warnings"] = plan_.warnings + list(getattr(scorer, "warnings", []))
    return (results, records) if return_records else results


def _set_seeds(seeds) -> None:
    if seeds[0] is not None:
        random.seed(seeds[0])
    if seeds[1] is not None:
        import numpy as np

        np.random.seed(seeds[1])
    if seeds[2] is not None:
        torch.manual_seed(seeds[2])


def _device_of(model) -> str | None:
    try:
        return str(next(model.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        return None  # not a torch module: refused later, once the tasks say what they need


def _early_tokenizer(model, add_bos, args: ModelArgs, needed: bool):
    """The folder's tokenizer, loaded before planning; a failure waits for the model load to report it
    (after the task checks, as before) unless chat prompts need it now."""
    try:
        return load_tokenizer(str(model), add_bos_token=add_bos, hub_kwargs=args.hub_kwargs())
    except CheckpointError:
        if needed:
            raise
        return None


from .encoder.harness import load_encoder  # noqa: E402  registers the encoder output types
