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

Most steps work on one document at a time. Task code (the ``custom`` filter's ``filter_fn``, or a
filter class given as ``function: !function utils.MyFilter``, both only with ``--allow-code``)
is called as lm-eval calls it: once per pipeline with every document's responses and documents,
so code that looks across documents gets the same answer (:meth:`FilterPipeline.apply_all`).

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


def regex_pos(regex_pattern: str = r"\['(.*?)'\]", group_select: int = 0, fallback: Any = None) -> Step:
    """The part-of-speech tags of ``('token', 'TAG')`` pairs in each response (or in a list of pairs).

    As lm-eval's ``regex_pos``: ``regex_pattern`` and ``group_select`` are accepted but unused (the
    pair pattern is fixed); a response without pairs becomes ``fallback`` (default ``["invalid"]``).
    """
    re.compile(regex_pattern)  # a bad pattern fails when the task loads, as in lm-eval
    missing = ["invalid"] if fallback is None else fallback
    pairs = re.compile(r"\('([^']*)', '([^']*)'\)")

    def tags(resp: Any) -> Any:
        found = pairs.findall(resp) if isinstance(resp, str) else resp
        return [tag for _, tag in found] or missing

    return lambda resps, doc: [tags(r) for r in resps]


_SPAN_LABELS = {"person": "PER", "location": "LOC", "organization": "ORG", "counties": "LOC", "places": "LOC",
                "people": "PER", "persons": "PER", "company": "ORG", "country": "LOC", "continent": "LOC",
                "time": "DATE", "date": "DATE", "per": "PER", "loc": "LOC", "org": "ORG"}


def format_span() -> Step:
    """Named-entity answers normalised to ``label: entity $ label: entity`` (lm-eval's ``format_span``).

    Label words (``person:``, ``loc:``, ...) become PER / LOC / ORG / DATE, entities listed after a
    label with commas are split, ``none`` entities are dropped; the text is lower-cased first.
    """
    label_patterns = [(re.compile(rf"\b{re.escape(word)}\s*:"), f"{label}:") for word, label in _SPAN_LABELS.items()]
    entity = re.compile(r"\b(PER|LOC|ORG|DATE):\s*([^$]+)")

    def normalise_labels(text: str) -> str:
        text = text.lower()
        for pattern, replacement in label_patterns:
            text = pattern.sub(replacement, text)
        return "$".join(text.split("$$")).rstrip("$")

    def spans(text: str) -> str:
        found = entity.findall(text.replace("\n", "$").strip())
        return " $ ".join(f"{label.lower()}: {name.strip()}" for label, names in found
                          for name in names.split(",") if name.strip().lower() != "none")

    return lambda resps, doc: [spans(normalise_labels(r.lower())) for r in resps]


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
    "regex_pos": regex_pos,
    "format_span": format_span,
}
# lm-eval filters that run task code or serve one task family; named in the error.
NOT_SUPPORTED = {"decontaminate": "lm-eval does not implement it either"}
# Steps that run task code over the whole task at once: (all responses, all documents) -> all filtered.
TaskStep = Callable[[list, list], list]


@dataclass(frozen=True)
class CodeStep:
    """A step that is task code: called once with every document (lm-eval's ``Filter.apply(resps, docs)``)."""

    run: TaskStep


@dataclass(frozen=True)
class FilterPipeline:
    """A named chain of steps; ``apply_all`` filters a whole task, ``apply`` one document."""

    name: str
    steps: tuple[tuple[str, Step | CodeStep], ...]

    def _fail(self, function: str, exc: Exception, value: Any) -> TaskError:
        if isinstance(exc, TaskError):
            return TaskError(f"Filter {self.name!r}, step {function!r}: {exc}")
        shown = repr(value)
        shown = shown if len(shown) <= 200 else shown[:197] + "..."
        return TaskError(f"Filter {self.name!r}, step {function!r} failed on {shown}: {type(exc).__name__}: {exc} "
                         "(lm-eval 0.4.13 fails here too).")

    def apply_all(self, resps: list[list], docs: list[dict]) -> list:
        """Every document's filtered responses, steps in order over the whole task (lm-eval's order)."""
        resps = list(resps)
        for function, step in self.steps:
            if isinstance(step, CodeStep):
                try:
                    out = step.run(resps, docs)
                    resps = list(out)  # lm-eval's filters may return generators
                except Exception as exc:  # task code: any failure, named
                    raise self._fail(function, exc, "the task's responses") from None
                if len(resps) != len(docs):
                    raise TaskError(f"Filter {self.name!r}, step {function!r} returned {len(resps)} filtered "
                                    f"responses for {len(docs)} documents; it must keep one per document.")
                continue
            for i, (value, doc) in enumerate(zip(resps, docs)):
                try:
                    resps[i] = step(value, doc)
                except (TaskError, AttributeError, TypeError, KeyError, IndexError, ValueError) as exc:
                    failure = self._fail(function, exc, value)
                    raise (TaskError(f"document {i}: {failure}") if len(docs) > 1 else failure) from None
        return resps

    def apply(self, resps: list, doc: dict) -> Any:
        """One document's filtered responses (code steps see that document alone)."""
        return self.apply_all([resps], [doc])[0]


DEFAULT_PIPELINE = FilterPipeline("none", (("take_first", take_first()),))


def _code_step(factory: Any, kwargs: dict[str, Any], where: str, what: str) -> CodeStep:
    """A filter class from task code (``!function utils.MyFilter``): built per run with ``kwargs``, as lm-eval does."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"{where}: filter {what} got arguments {sorted(kwargs)}: {exc}.") from None

    def run(resps: list, docs: list) -> list:
        instance = factory(**kwargs)
        if not callable(getattr(instance, "apply", None)):
            raise TaskError(f"{what} built a {type(instance).__name__} without an apply(resps, docs) method "
                            "(a filter must be a class like lm-eval's Filter)")
        return instance.apply(resps, docs)

    return CodeStep(run)


def _custom_step(kwargs: dict[str, Any], where: str) -> CodeStep:
    """lm-eval's ``custom`` filter: ``filter_fn(resps, docs)``, a ``!function`` from the task folder."""
    extra = sorted(set(kwargs) - {"filter_fn"})
    if extra:
        raise TaskError(f"{where}: filter 'custom' got arguments {extra}; it accepts ['filter_fn'].")
    filter_fn = kwargs.get("filter_fn")
    if isinstance(filter_fn, UnsafeFunction):
        raise TaskError(f"{where}: filter 'custom' runs `{filter_fn!r}`, Python code from the task directory. "
                        "Re-run with --allow-code (allow_code=True) if you trust it.")
    if not callable(filter_fn):
        raise TaskError(f"{where}: filter 'custom' needs `filter_fn: !function module.function`, got {filter_fn!r}.")
    return CodeStep(lambda resps, docs: filter_fn(resps, docs))


def build_step(function: Any, kwargs: dict[str, Any], where: str) -> Step | CodeStep:
    """One step from its name and YAML arguments; unknown names and bad arguments are a :class:`TaskError`."""
    if isinstance(function, UnsafeFunction):
        raise TaskError(f"{where}: the filter `{function!r}` is Python code from the task directory. Re-run with "
                        "--allow-code (allow_code=True) if you trust it.")
    if callable(function):
        what = getattr(function, "__qualname__", repr(function))
        if not inspect.isclass(function):  # lm-eval builds a filter as function(**args): a class, never a call
            raise TaskError(f"{where}: the filter {what} is a function; a filter given as code must be a class with "
                            "apply(resps, docs) (or use `function: custom` with `filter_fn`).")
        return _code_step(function, kwargs, where, what)
    if function == "custom":
        return _custom_step(kwargs, where)
    if not isinstance(function, str) or function not in FILTERS:
        why = f" ({NOT_SUPPORTED[function]})" if isinstance(function, str) and function in NOT_SUPPORTED else ""
        raise TaskError(f"{where}: unknown or unsupported filter function {function!r}{why}; "
                        f"supported: {sorted([*FILTERS, 'custom'])} or a filter class (--allow-code).")
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
