"""Checking tasks without a model or a dataset: what ``hfx eval`` would accept, and why not.

:func:`validate_task` runs the checks a task passes before ``hfx eval`` loads a model (its config
merged and parsed, ``Task(config)``'s key / filter / ``!function`` checks, hooks imported under
``allow_code``) plus the static ones the evaluator relies on (output type, metrics and aggregations
known, every template compiles in the sandbox). :func:`validate` does it for many names at once,
groups and tags expanded, so one run reports every refused task instead of the first one.
``hfx tasks validate`` prints these verdicts; ``evaluate`` calls :func:`validate` to refuse a run
before its model loads.

A verdict is ``accepted``, ``refused`` (a reason a user can act on: a missing optional package, a
key hfx does not implement, a bad template) or ``error`` (the validator itself crashed: a bug).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .groups import GroupNode
from .templates import TaskError

ACCEPTED, REFUSED, ERROR = "accepted", "refused", "error"
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice", "description", "gen_prefix")
# transformers 5 removed this module; 37 of lm-eval 0.4.13's hook files still import it
REMOVED_MODULES = {"transformers.data.metrics": "transformers 5 removed it"}


@dataclass
class Verdict:
    """One task, group or tag: whether ``hfx eval`` accepts it, and the one reason if not."""

    name: str
    kind: str  # "task" | "group" | "tag"
    status: str  # ACCEPTED | REFUSED | ERROR
    reason: str = ""
    source: str = ""
    output_type: str | None = None
    members: list[str] = field(default_factory=list)  # a group's or tag's tasks, in order
    refused_members: list[str] = field(default_factory=list)
    task: Any = field(default=None, repr=False, compare=False)  # an accepted task, for its groups' checks
    warnings: list[str] = field(default_factory=list)  # accepted, but e.g. an aggregate no member reports

    @property
    def accepted(self) -> bool:
        return self.status == ACCEPTED

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "status": self.status, "reason": self.reason}
        if self.source:
            out["source"] = self.source
        if self.output_type is not None:
            out["output_type"] = self.output_type
        if self.refused_members:
            out["refused_members"] = self.refused_members
        if self.warnings:
            out["warnings"] = self.warnings
        return out


# -- templates --------------------------------------------------------------------------------
def compile_template(template: str, where: str) -> None:
    """Compile ``template`` in the evaluation sandbox (the environment ``render`` uses): syntax errors surface now."""
    from jinja2 import TemplateError

    from .templates import _compile

    try:
        _compile(template)
    except TemplateError as exc:
        raise TaskError(f"{where} {template[:200]!r} is not a valid Jinja template: {exc}") from None


def _template_specs(config) -> Iterable[tuple[str, str]]:
    extra = getattr(config, "extra", {}) or {}
    for key in TEMPLATE_KEYS:
        value = getattr(config, key, None) if hasattr(config, key) else extra.get(key)
        if isinstance(value, str):
            yield key, value
    for key in TEMPLATE_KEYS:
        value = (config.fewshot_config or {}).get(key)
        if isinstance(value, str):
            yield f"fewshot_config.{key}", value


# -- the static checks the evaluator relies on ------------------------------------------------
def check_task(task) -> None:
    """The evaluator's checks that need no data: output type, metric_list (names, hooks, aggregations), templates.

    The same functions ``evaluate_tasks`` calls before scoring (``metric_names`` checks the whole
    ``metric_list`` through ``metric_specs``), so an accepted task passes them there too.
    """
    from .metrics import get_metric
    from .output_types import OUTPUT_TYPES, metric_names

    if task.output_type not in OUTPUT_TYPES:
        raise TaskError(f"Task {task.name!r}: output_type {task.output_type!r} has no evaluator; known: "
                        f"{sorted(OUTPUT_TYPES)}.")
    for name in metric_names(task):
        get_metric(name)
    for key, template in _template_specs(task.config):
        compile_template(template, f"Task {task.name!r}: {key}")


# -- reasons ----------------------------------------------------------------------------------
def _missing_module(exc: BaseException) -> str | None:
    """The module whose absence caused ``exc`` (walking its causes), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            return exc.name
        if isinstance(exc, ImportError) and "transformers.data.metrics" in str(exc):
            return "transformers.data.metrics"
        exc = exc.__cause__ or exc.__context__
    return None


def _reason(exc: BaseException) -> str:
    """One line for a refusal: a missing optional package is named as such."""
    module = _missing_module(exc)
    text = " ".join(str(exc).split())
    if module is not None:
        for removed, why in REMOVED_MODULES.items():
            if module == removed or module.startswith(removed + "."):
                return f"hook imports {removed} ({why}; lm-eval fails on it too): {text}"
        top = module.split(".")[0]
        return f"needs optional package {top} (not installed; lm-eval fails on it too): {text}"
    return text


_CATEGORIES = (
    (re.compile(r"^(needs optional package \S+)"), r"\1"),
    (re.compile(r"^hook imports (\S+)"), r"hook imports \1"),
    (re.compile(r"[Uu]nknown metric '([^']+)'"), r"unknown metric \1"),
    (re.compile(r"metric '([^']+)' is not in lm-eval's registry"), r"metric \1 not in lm-eval's registry (hub evaluate)"),
    (re.compile(r"is a Python class task, `class: ([^`]+)`"), r"class task \1"),
    (re.compile(r"unknown aggregation '([^']+)'"), r"unknown aggregation \1"),
    (re.compile(r"metric '([^']+)' sets `hf_evaluate: true`"), r"hub evaluate metric \1 (hf_evaluate)"),
    (re.compile(r"sets `([^`]+)`"), r"unsupported key \1"),
    (re.compile(r"uses `!function|the filter `!function [^`]+` is Python code|runs `!function"),
     "!function without --allow-code"),
    (re.compile(r"outside the task folder"), "!function outside the task folder"),
    (re.compile(r"output_type '([^']+)' has no evaluator"), r"output_type \1"),
    (re.compile(r"unknown or unsupported filter function '([^']+)'"), r"filter function \1"),
    (re.compile(r"include must name YAML files"), "include is not a file name or a list of them"),
    (re.compile(r"repeats=\d+ with do_sample"), "repeats with do_sample"),
    (re.compile(r"is not a valid Jinja template"), "template does not compile"),
    (re.compile(r"member '([^']+)' (?:refused|not accepted)"), "group member refused"),
)


def reason_category(reason: str) -> str:
    """A short key grouping refusals with the same cause (task names, paths and quotes dropped)."""
    for pattern, repl in _CATEGORIES:
        match = pattern.search(reason)
        if match:
            return match.expand(repl) if "\\" in repl else repl
    text = re.sub(r"Task '[^']*'", "Task", reason)
    text = re.sub(r"(/[^\s:,]+)+", "<path>", text)
    text = re.sub(r"'[^']{20,}'", "'…'", text)
    return text[:140]


# -- one task ---------------------------------------------------------------------------------
def _source(index, name: str) -> str:
    entries = getattr(index, "entries", None)
    entry = (entries if entries is not None else index.sources).get(name)  # ``sources`` builds a dict per call
    if entry is None:
        return ""
    return str(entry.path) if getattr(entry, "path", None) is not None else getattr(entry, "origin", "")


def validate_task(index, ref) -> Verdict:
    """Whether ``hfx eval`` accepts task ``ref`` (a name or a group's :class:`~.groups.TaskRef`) of ``index``.

    ``index`` is a :class:`~.catalogue.TaskIndex`; nothing but the task's files (and, with the
    index's ``allow_code``, its hook modules) is read.
    """
    name = ref if isinstance(ref, str) else ref.name
    source = _source(index, name) or ("inline" if not isinstance(ref, str) and ref.overrides else "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys are reported by hfx eval itself
            task = index.load(ref)
            check_task(task)
    except (TaskError, ImportError) as exc:  # ImportError: a hook's import that escaped the loader
        return Verdict(name, "task", REFUSED, _reason(exc), source)
    except SystemExit as exc:  # a hook module that exits when imported (slr_bench without swipl)
        return Verdict(name, "task", REFUSED, f"a hook module exited while being imported (SystemExit {exc.code!r}); "
                       "lm-eval fails on it too", source)
    except Exception as exc:  # the validator's own bug: counted, never hidden
        return Verdict(name, "task", ERROR, f"{type(exc).__name__}: {' '.join(str(exc).split())}", source)
    return Verdict(name, "task", ACCEPTED, "", source, output_type=task.output_type, task=task)


# -- groups and tags --------------------------------------------------------------------------
def _group_names(index) -> dict[str, str]:
    """``{group name: source}`` of the index's ``group:`` configs (empty for an index without groups)."""
    entries = getattr(index, "entries", None)
    if entries is None:
        return {}
    return {name: str(e.path) if e.path is not None else e.origin
            for name, e in entries.items() if e.kind == "group"}


def _kind(index, name: str) -> str | None:
    kind = getattr(index, "kind", None)
    if callable(kind):
        return kind(name)
    return "task" if name in index.sources else ("tag" if name in index.tags() else None)


def _ref_key(ref) -> str:
    return ref.name if not ref.overrides else f"{ref.name} {ref.overrides!r}"


def _validate_ref(index, ref, cache: dict[str, Verdict]) -> Verdict:
    """A group leaf: the task with the overrides its group wrote (an inline task: the overrides alone)."""
    key = _ref_key(ref)
    if key not in cache:
        cache[key] = validate_task(index, ref.name) if not ref.overrides else validate_task(index, ref)
    return cache[key]


def _collective(name: str, kind: str, source: str, members: list[Verdict]) -> Verdict:
    """A group or tag: accepted when every member task is; else refused naming the first refused member."""
    bad = [v for v in members if not v.accepted]
    verdict = Verdict(name, kind, ACCEPTED, "", source, members=[v.name for v in members],
                      refused_members=[v.name for v in bad])
    if not members:
        verdict.status, verdict.reason = REFUSED, f"{kind} {name!r} has no member tasks"
    elif bad:
        first = bad[0]
        verdict.status = ERROR if first.status == ERROR else REFUSED
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        verdict.reason = f"member {first.name!r} refused{more}: {first.reason}"
    return verdict


def validate_group(index, name: str, cache: dict[str, Verdict] | None = None) -> tuple[Verdict, list[Verdict]]:
    """A group's verdict and its leaves' verdicts: resolved when its whole membership resolves and validates."""
    cache = {} if cache is None else cache
    source = _group_names(index).get(name, "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            node = index.resolve([name])[0]
        refs = node.task_refs()
    except (TaskError, ImportError) as exc:
        return Verdict(name, "group", REFUSED, _reason(exc), source), []
    except Exception as exc:
        return Verdict(name, "group", ERROR, f"{type(exc).__name__}: {' '.join(str(exc).split())}", source), []
    leaves = [_validate_ref(index, ref, cache) for ref in refs]
    verdict = _collective(name, "group", source or getattr(node, "source", ""), leaves)
    if verdict.accepted:  # hfx eval's aggregate check: a metric no member reports gets no aggregate
        from .evaluator import unreported_aggregates

        tasks = {ref.name: leaf.task for ref, leaf in zip(refs, leaves)}
        for group in [node] + [n for _, n in node.walk() if isinstance(n, GroupNode)]:
            verdict.warnings.extend(unreported_aggregates(group, tasks))
    return verdict, leaves


def list_entries(index) -> list[dict[str, Any]]:
    """``{name, kind, output_type, source}`` for every task, group and tag of ``index``; nothing is imported."""
    records = []
    for entry in index.listing():
        if entry.kind == "tag":
            source = f"tag of {len(entry.members)} tasks"
        else:
            source = str(entry.path) if entry.path is not None else entry.origin
        output_type = None
        if entry.kind == "task":
            output_type = entry.output_type or ("python class" if entry.class_name else "generate_until")
        records.append({"name": entry.name, "kind": entry.kind, "output_type": output_type, "source": source})
    return records


def validate(index, names: Iterable[str] | None = None) -> list[Verdict]:
    """Verdicts for ``names`` (tasks, groups or tags; default: everything in ``index``), groups and tags expanded.

    One record per task, then per group, then per tag; each task is checked once. An unknown
    name raises :class:`TaskError` with the closest known ones (``index.expand``'s message).
    """
    groups = _group_names(index)
    tags = index.tags()
    if names is None:
        task_names, group_names, tag_names = index.names(), sorted(groups), sorted(tags)
    else:
        task_names, group_names, tag_names = [], [], []
        for name in names:
            kind = _kind(index, name)
            if kind is None:
                index.resolve([name])  # raises with the closest names (or the file's parse error)
            {"group": group_names, "tag": tag_names}.get(kind, task_names).append(name)
    cache: dict[str, Verdict] = {}

    def task_verdict(name: str) -> Verdict:
        if name not in cache:
            cache[name] = validate_task(index, name)
        return cache[name]

    out: dict[tuple[str, str], Verdict] = {}
    for name in task_names:
        out[("task", name)] = task_verdict(name)
    group_verdicts = []
    for name in dict.fromkeys(group_names):
        verdict, leaves = validate_group(index, name, cache)
        group_verdicts.append(verdict)
        for leaf in leaves:  # everything: the index's own tasks already; named: inline ones too
            if names is not None or _kind(index, leaf.name) == "task":
                out.setdefault(("task", leaf.name), leaf)
    tag_verdicts = []
    for name in dict.fromkeys(tag_names):
        members = [task_verdict(m) for m in tags[name] if _kind(index, m) == "task"]
        for member in members:
            out.setdefault(("task", member.name), member)
        tag_verdicts.append(_collective(name, "tag", "", members))
    if names is None:
        for path, exc in getattr(index, "broken", {}).items():
            out.setdefault(("file", str(path)), Verdict(str(path), "task", REFUSED, _reason(exc), str(path)))
    return list(out.values()) + group_verdicts + tag_verdicts


def summary_lines(verdicts: list[Verdict], *, reasons: bool = True) -> list[str]:
    """Counts per kind and status, then (with ``reasons``) one line per refused task or group."""
    lines = []
    for kind in ("task", "group", "tag"):
        of_kind = [v for v in verdicts if v.kind == kind]
        if not of_kind:
            continue
        counts = {s: sum(v.status == s for v in of_kind) for s in (ACCEPTED, REFUSED, ERROR)}
        share = counts[ACCEPTED] / len(of_kind)
        label = "resolved" if kind != "task" else "accepted"
        lines.append(f"{kind}s: {len(of_kind)}: {counts[ACCEPTED]} {label} ({share:.1%}), {counts[REFUSED]} refused, "
                     f"{counts[ERROR]} error")
    if reasons:
        for verdict in verdicts:
            if not verdict.accepted and verdict.kind != "tag":
                lines.append(f"{verdict.status} {verdict.kind} {verdict.name}: {verdict.reason}")
            for warning in verdict.warnings:
                lines.append(f"warning {verdict.kind} {verdict.name}: {warning}")
    return lines


def reason_table(verdicts: list[Verdict], top: int = 20) -> list[tuple[int, str, str]]:
    """``(count, category, example task)`` of the most frequent refusal causes among tasks."""
    counts: dict[str, list[str]] = {}
    for verdict in verdicts:
        if verdict.kind == "task" and not verdict.accepted:
            counts.setdefault(reason_category(verdict.reason), []).append(verdict.name)
    ranked = sorted(counts.items(), key=lambda item: (-len(item[1]), item[0]))[:top]
    return [(len(names), category, names[0]) for category, names in ranked]
