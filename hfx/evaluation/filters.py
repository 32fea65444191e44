"""Filter pipelines for ``generate_until`` tasks, as lm-eval 0.4.13's ``filter_list`` runs them.

Why: GSM8K-style task files score a *post-processed* answer (``strict-match`` /
``flexible-extract`` regex pipelines) and report ``exact_match,<pipeline name>``. Scoring the raw
generation instead would give other numbers under other keys, so the pipelines are part of
"an lm-eval task file runs unchanged, same numbers".

A task file names pipelines::

    filter_list:
      - name: strict-match
        filter:
          - {function: regex, regex_pattern: "#### (\\-?[0-9\\.\\,]+)"}
          - {function: take_first}

Each pipeline starts from one document's responses (a list: one generation per ``repeats``) and
applies its steps in order; the result is what the metric scores, under the key
``"<metric>,<pipeline name>"``. Without ``filter_list`` there is one pipeline, ``none``
(``take_first``), which is lm-eval's default. Steps keep lm-eval's exact semantics, odd corners
included: a step is applied to each item of what the previous step returned, so a per-response
step placed after ``take_first`` walks the characters of the string (a warning says so).

Pipelines are built and their arguments checked when the task is loaded, before any model runs;
an unknown function is a :class:`TaskError` naming the supported ones.
"""

from __future__ import annotations

import inspect
import re
import sys
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .templates import TaskError, UnsafeFunction

# A step maps one document's (responses, doc) to the filtered responses.
Step = Callable[[Any, dict], Any]


def _text(resp: Any) -> str:
    return resp if isinstance(resp, str) else ""


def _select(found: list, group_select: int) -> Any:
    try:
        return found[group_select]
    except IndexError:
        raise TaskError(
            f"group_select={group_select} but the pattern matched only {len(found)} time(s); "
            "lm-eval 0.4.13 fails on this document too."
        ) from None


def _match(pattern: re.Pattern, resp: Any, group_select: int, empty: str) -> str | None:
    """Match number ``group_select`` of ``findall`` (a tuple gives its first non-empty group, else
    ``empty``), stripped; None when nothing matches."""
    found = pattern.findall(_text(resp))
    if not found:
        return None
    picked = _select(found, group_select)
    if isinstance(picked, tuple):
        picked = next((group for group in picked if group), empty)
    return picked.strip()


def regex(regex_pattern: str = r"#### (\-?[0-9\.\,]+)", group_select: int = 0, fallback: str = "[invalid]") -> Step:
    """Each response becomes one match of ``regex_pattern`` (``re.findall``), picked by ``group_select``.

    With several groups a match is a tuple: its first non-empty group is kept (``fallback`` when all
    are empty). The kept text is stripped; a response with no match becomes ``fallback`` unstripped.
    """
    if not isinstance(group_select, int):
        raise TaskError(f"regex: group_select must be an integer, got {group_select!r}.")
    pattern = re.compile(regex_pattern)

    def one(resp: Any) -> str:
        found = _match(pattern, resp, group_select, fallback)
        return fallback if found is None else found

    return lambda resps, doc: [one(r) for r in resps]


def remove_whitespace() -> Step:
    """Strip leading and trailing whitespace from each response."""
    return lambda resps, doc: [r.strip() for r in resps]


def lowercase() -> Step:
    return lambda resps, doc: [r.lower() for r in resps]


def uppercase() -> Step:
    return lambda resps, doc: [r.upper() for r in resps]


def map_values(mapping_dict: dict | None = None, default_value: Any = None) -> Step:
    """Replace each response by ``mapping_dict[response]``, or ``default_value`` when it is not a key."""
    mapping = {} if mapping_dict is None else mapping_dict
    if not isinstance(mapping, dict):
        raise TaskError(f"map: mapping_dict must be a mapping, got {type(mapping).__name__}.")
    return lambda resps, doc: [mapping.get(r, default_value) for r in resps]


def take_first() -> Step:
    """Keep the first response only: the document's value becomes that response itself."""
    return lambda resps, doc: resps[0]


def take_first_k(k: int, **_ignored: Any) -> Step:
    """Keep the first ``k`` responses (needs ``repeats >= k``)."""

    def step(resps, doc):
        if len(resps) < k:
            raise TaskError(f"take_first_k: k={k} but a document has only {len(resps)} responses; raise `repeats`.")
        return resps[:k]

    return step


def majority_vote() -> Step:
    """The most frequent response, as a one-item list; a tie goes to the response seen first."""

    def step(resps, doc):
        counts: dict[Any, int] = {}
        for r in resps:
            counts[r] = counts.get(r, 0) + 1
        best = max(counts.values())
        return [next(r for r, n in counts.items() if n == best)]

    return step


@lru_cache(maxsize=1)
def _punctuation_table() -> dict[int, None]:
    return dict.fromkeys(i for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P"))


def multi_choice_regex(
    regex_pattern: str = r"#### (\-?[0-9\.\,]+)",
    group_select: int = 0,
    fallback: str = "[invalid]",
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    regexes_to_ignore: list[str] | None = None,
) -> Step:
    """A letter answer ``(A)``, ``(B)``, … for documents with a ``choices`` field.

    Tried in order: ``regex_pattern``; else the text of a choice found in the response (after the
    ``ignore_*`` normalisations; the longest choice wins overlaps), mapped to its letter; else
    ``":`` + a bare letter; else ``fallback``.
    """
    pattern = re.compile(regex_pattern)

    def normalise(text: str) -> str:
        for ignored in regexes_to_ignore or ():
            text = re.sub(ignored, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(_punctuation_table())
        return text

    def first(compiled: re.Pattern, resp: Any, to_letter: dict[str, str]) -> str | None:
        found = _match(compiled, resp, group_select, "")
        return to_letter.get(found, found) if found else found

    def step(resps, doc):
        if "choices" not in doc:
            raise TaskError(f"multi_choice_regex needs a `choices` field; the document has {sorted(doc)}.")
        texts, letters = {}, []
        for i, choice in enumerate(doc["choices"]):
            letter = chr(ord("A") + i)
            texts[normalise(choice.strip())] = f"({letter})"
            letters.append(letter)
        by_text = re.compile("|".join(sorted((re.escape(t) for t in texts), key=len, reverse=True)))
        by_letter = re.compile(rf":[\s]*({'|'.join(letters)})")
        out = []
        for resp in resps:
            answer = (first(pattern, resp, {})
                      or first(by_text, normalise(_text(resp)), texts)
                      or first(by_letter, resp, {x: f"({x})" for x in letters}))
            out.append(answer or fallback)
        return out

    return step


FILTERS: dict[str, Callable[..., Step]] = {
    "regex": regex,
    "multi_choice_regex": multi_choice_regex,
    "remove_whitespace": remove_whitespace,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "map": map_values,
    "take_first": take_first,
    "take_first_k": take_first_k,
    "majority_vote": majority_vote,
}
# lm-eval filters that run task code or serve one task family; named in the error.
NOT_SUPPORTED = {"custom": "it runs a Python `filter_fn`", "regex_pos": "it serves one POS-tagging task",
                 "format_span": "it serves one NER task", "decontaminate": "lm-eval does not implement it either"}


@dataclass(frozen=True)
class FilterPipeline:
    """A named chain of steps; ``apply`` gives one document's filtered responses."""

    name: str
    steps: tuple[tuple[str, Step], ...]

    def apply(self, resps: list, doc: dict) -> Any:
        for function, step in self.steps:
            try:
                resps = step(resps, doc)
            except TaskError as exc:
                raise TaskError(f"Filter {self.name!r}, step {function!r}: {exc}") from None
            except (AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
                raise TaskError(
                    f"Filter {self.name!r}, step {function!r} failed on {resps!r}: {type(exc).__name__}: {exc} "
                    "(lm-eval 0.4.13 fails here too)."
                ) from None
        return resps


DEFAULT_PIPELINE = FilterPipeline("none", (("take_first", take_first()),))


def build_step(function: Any, kwargs: dict[str, Any], where: str) -> Step:
    """One step from its name and YAML arguments; unknown names and bad arguments are a :class:`TaskError`."""
    if callable(function) or isinstance(function, UnsafeFunction):
        raise TaskError(f"{where}: a filter given as Python code ({function!r}) is not supported; "
                        f"supported functions: {sorted(FILTERS)}.")
    if not isinstance(function, str) or function not in FILTERS:
        why = f" ({NOT_SUPPORTED[function]})" if isinstance(function, str) and function in NOT_SUPPORTED else ""
        raise TaskError(f"{where}: unknown or unsupported filter function {function!r}{why}; "
                        f"supported: {sorted(FILTERS)}.")
    factory = FILTERS[function]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(factory).parameters if not p.startswith("_")]
        raise TaskError(f"{where}: filter {function!r} got arguments {sorted(kwargs)}: {exc}; "
                        f"it accepts {accepted}.") from None
    try:
        return factory(**kwargs)
    except re.error as exc:
        raise TaskError(f"{where}: filter {function!r}: bad regular expression: {exc}.") from None


def build_pipelines(filter_list: Any, task: str = "task") -> list[FilterPipeline]:
    """The task's pipelines in file order (``[DEFAULT_PIPELINE]`` without ``filter_list``).

    A name given twice keeps its first position and its last definition, as lm-eval's
    per-name results do.
    """
    if filter_list is None:
        return [DEFAULT_PIPELINE]
    where = f"Task {task!r}: filter_list"
    if not isinstance(filter_list, list) or not filter_list:
        raise TaskError(f"{where} must be a non-empty list of {{name, filter: [{{function, ...}}]}}, "
                        f"got {filter_list!r}.")
    pipelines: dict[str, FilterPipeline] = {}
    for entry in filter_list:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("filter"), list):
            raise TaskError(f"{where}: each entry needs `name` (a string) and `filter` (a list), got {entry!r}.")
        name = entry["name"]
        steps = []
        for spec in entry["filter"]:
            if not isinstance(spec, dict) or "function" not in spec:
                raise TaskError(f"{where} {name!r}: each step needs `function`, got {spec!r}.")
            function = spec["function"]
            kwargs = {k: v for k, v in spec.items() if k != "function"}
            steps.append((function, build_step(function, kwargs, f"{where} {name!r}")))
        functions = [function for function, _ in steps]
        if "take_first" in functions[:-1]:
            warnings.warn(
                f"Task {task!r}, filter {name!r} {functions}: a step after take_first works, as in lm-eval, on the "
                "characters of the kept response. Put take_first last.",
                stacklevel=2,
            )
        if name in pipelines:
            warnings.warn(f"Task {task!r}: filter name {name!r} is used twice; the last definition is scored "
                          "(as in lm-eval).", stacklevel=2)
        pipelines[name] = FilterPipeline(name, tuple(steps))
    return list(pipelines.values())
