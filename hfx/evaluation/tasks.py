"""Tasks as data: lm-evaluation-harness YAML task files, loaded and rendered as lm-eval 0.4.13 does.

A task is a mapping with lm-eval's keys (``task``, ``dataset_path``, ``dataset_name``,
``dataset_kwargs``, ``training_split`` / ``validation_split`` / ``test_split`` / ``fewshot_split``,
``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``, ``description``, ``target_delimiter``,
``fewshot_delimiter``, ``fewshot_config``, ``num_fewshot``, ``output_type``, ``metric_list``,
``generation_kwargs``, ``repeats``, ``filter_list`` (see :mod:`.filters`), ``process_docs``, ``include``,
``tag``, ``metadata``, ``gen_prefix``, and the Python hooks ``process_results`` / ``custom_dataset`` /
``fewshot_config.samples``, which run only with ``allow_code``). Multiple-input tasks (``doc_to_text``
gives the index of the gold context among the ``doc_to_choice`` contexts, as winogrande) are
rendered as lm-eval renders them. lm-eval keys that would change prompts or scores and that hfx
does not implement (``use_prompt``, images, audio) are refused when the task is loaded, never
silently ignored; keys that leave the numbers unchanged are kept. Python ``class:`` tasks (lm-eval
Task subclasses, ``allow_code``) run through their lm-eval object (:mod:`.class_tasks`). A hook
that raises is a :class:`TaskError` naming the task, the hook and the document. Tasks come from

- YAML files under ``--include-path`` directories (only those directories are read: no global
  index of thousands of files is built before a run), and
- plugins in the entry-point group ``hfx.tasks``: ``Component.factory()`` returns a list whose
  items are task mappings (dicts, as a parsed YAML), :class:`TaskConfig` objects, or paths to YAML
  files or directories. A plugin that fails to load is skipped with a warning naming it.

A task file that cannot be read (bad YAML, an alias bomb, not UTF-8, ...) is skipped with a
warning naming it, so the other tasks of its folder still load; asking for a task defined in it
raises that error. ``include:`` chains are bounded and cycle-checked; local data files are
checked (present, non-empty, UTF-8, JSON records) before ``datasets`` reads them.

Public API (also used by the encoder evaluators): :class:`TaskConfig`, :class:`Task`,
:class:`TaskError`. Finding tasks by name (the index of files, tags and groups) is :mod:`.catalogue`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import Message, PromptFormat, join_delimited, messages_text
from .filters import build_pipelines
from .samplers import get_sampler
from .templates import TaskError, UnsafeFunction, find_unsafe, render

OUTPUT_TYPES_LM = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")


@dataclass
class TaskConfig:
    """One task, with lm-eval's field names and defaults. Unknown keys are kept in ``extra``."""

    task: str
    dataset_path: str | None = None
    dataset_name: str | None = None
    dataset_kwargs: dict | None = None
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    process_docs: Callable | None = None
    doc_to_text: Any = None
    doc_to_target: Any = None
    doc_to_choice: Any = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_config: dict | None = None
    num_fewshot: int | None = None
    output_type: str = "generate_until"
    metric_list: list | None = None
    generation_kwargs: dict | None = None
    repeats: int = 1
    filter_list: list | None = None
    tag: Any = None
    metadata: dict | None = None
    process_results: Any = None
    gen_prefix: Any = None
    custom_dataset: Any = None
    task_alias: str | None = None  # the name results and tables show (lm-eval's alias); prompts ignore it
    source: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> TaskConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "source"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "include"}
        if not isinstance(known.get("task"), str):
            raise TaskError(f"{source or 'task config'}: `task` must be a string name, got {known.get('task')!r}.")
        return cls(**known, source=source, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The config as written to results JSON (``configs``): None fields dropped, functions named."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("extra", "source") or value is None:
                continue
            out[f.name] = _printable(value)
        out.update({k: _printable(v) for k, v in self.extra.items()})
        return out


def _printable(value: Any) -> Any:
    if callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__name__', repr(value))}"
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else repr(value)


def _is_code(value: Any) -> bool:
    return callable(value) or isinstance(value, UnsafeFunction)


# lm-eval 0.4.13 keys that change prompts or scores and that hfx does not implement, with the test
# of "set" that lm-eval applies: such a task is refused rather than scored differently.
UNSUPPORTED_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_prompt": (lambda v: v is not None, "promptsource prompts, a package lm-eval 0.4.13 no longer ships"),
    "doc_to_image": (lambda v: v is not None, "image inputs"),
    "doc_to_audio": (lambda v: v is not None, "audio inputs"),
}
# lm-eval keys that leave the numbers unchanged: kept in ``extra`` (and the results' configs) only.
HARMLESS_KEYS = frozenset({"should_decontaminate", "doc_to_decontamination_query", "unsafe_code"})
def check_scoring_keys(config: TaskConfig) -> None:
    """Refuse lm-eval keys hfx would otherwise ignore while they change the numbers; warn on unknown keys.

    A ``class:`` task is checked by :func:`.class_tasks.check_class` (its object reads the other keys).
    """
    is_class = config.extra.get("class") is not None
    if is_class:
        from .class_tasks import check_class

        check_class(config)
    for key, (is_set, what) in UNSUPPORTED_KEYS.items():
        if key in config.extra and is_set(config.extra[key]):
            raise TaskError(
                f"Task {config.task!r} sets `{key}` ({what}), which hfx does not implement; scoring it without "
                "would give numbers that differ from lm-eval. Remove the key or run the task with lm-eval."
            )
    if is_class:
        return
    if not isinstance(config.repeats, int) or isinstance(config.repeats, bool) or config.repeats < 1:
        raise TaskError(f"Task {config.task!r}: repeats must be a positive integer, got {config.repeats!r}.")
    shots = config.num_fewshot
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 0):
        raise TaskError(f"Task {config.task!r} ({config.source or 'task config'}): num_fewshot must be an integer "
                        f">= 0, got {shots!r}.")
    if config.gen_prefix is not None and not isinstance(config.gen_prefix, str):
        raise TaskError(f"Task {config.task!r}: gen_prefix must be a field name or a template string, "
                        f"got {config.gen_prefix!r}.")
    # repeats of a log-likelihood request score the same numbers (lm-eval keeps the first): only sampling differs
    if config.repeats > 1 and config.output_type == "generate_until":
        if (config.generation_kwargs or {}).get("do_sample"):
            raise TaskError(
                f"Task {config.task!r}: repeats={config.repeats} with do_sample: true samples several answers; hfx "
                "decodes greedily (every repeat is the same answer), so its numbers would differ from lm-eval's."
            )
    if config.filter_list is not None and config.output_type != "generate_until":
        raise TaskError(f"Task {config.task!r}: filter_list is supported for generate_until tasks only, "
                        f"not {config.output_type}.")
    if config.output_type in OUTPUT_TYPES_LM:
        unknown = sorted(set(config.extra) - set(UNSUPPORTED_KEYS) - HARMLESS_KEYS - {"class"})
        if unknown:
            warnings.warn(f"Task {config.task!r}: ignoring keys {unknown}, which lm-eval 0.4.13 task files do not "
                          "define.", stacklevel=3)


LOCAL_FORMATS = ("json", "csv", "text")
_CHECK_RECORDS_UP_TO = 64 * 2**20  # bytes: larger JSON files are checked for encoding only, datasets parses them


def _data_file_paths(data_files: Any) -> list[Path]:
    """Local paths named by a ``data_files`` value (str, list, or split -> str/list); globs expanded."""
    if isinstance(data_files, dict):
        values = [v for value in data_files.values() for v in (value if isinstance(value, (list, tuple)) else [value])]
    elif isinstance(data_files, (list, tuple)):
        values = list(data_files)
    else:
        values = [data_files]
    paths: list[Path] = []
    for value in values:
        if not isinstance(value, (str, Path)) or "://" in str(value):
            continue
        text = str(value)
        if any(c in text for c in "*?["):
            import glob

            paths.extend(Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file())
        else:
            paths.append(Path(text))
    return paths


def _check_utf8(task: str, path: Path) -> None:
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise TaskError(f"Task {task!r}: data file {path} is not UTF-8 text (byte {offset + exc.start}: "
                                f"{chunk[exc.start:exc.start + 1]!r}); convert it to UTF-8.") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise TaskError(f"Task {task!r}: data file {path} is not UTF-8 text (it ends inside a character).") from None


def _check_json_records(task: str, path: Path, field_name: str | None) -> None:
    text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is allowed, as datasets allows it
    stripped = text.lstrip()
    if not stripped:
        raise TaskError(f"Task {task!r}: data file {path} has no records (only whitespace).")
    if field_name is not None or stripped[0] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskError(f"Task {task!r}: data file {path} is not valid JSON (line {exc.lineno}: {exc.msg}).") \
                from None
        records = data.get(field_name) if isinstance(data, dict) and field_name is not None else data
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise TaskError(f"Task {task!r}: data file {path} must hold a list of JSON objects"
                            f"{' under ' + repr(field_name) if field_name else ''}.")
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == 1 and stripped[0] == "{":
                try:  # one JSON object over several lines (datasets reads it as a table)
                    if isinstance(json.loads(text), dict):
                        return
                except json.JSONDecodeError:
                    pass
            raise TaskError(f"Task {task!r}: data file {path}, line {number}, is not valid JSON "
                            f"({exc.msg}, column {exc.colno}).") from None
        if not isinstance(record, dict):
            raise TaskError(f"Task {task!r}: data file {path}, line {number}, is a JSON {type(record).__name__}, "
                            "not an object (one document per line, e.g. {\"question\": ..., \"label\": ...}).")


def check_data_files(task: str, dataset_path: Any, kwargs: dict) -> list[Path]:
    """Local ``json`` / ``csv`` / ``text`` data files: present, non-empty, UTF-8, and (JSON) one object per record.

    Each problem is one :class:`TaskError` naming the file, raised before ``datasets`` reads it (an
    empty file makes datasets raise a bare ``StopIteration``; a non-UTF-8 JSON file or a line that is
    a list loads silently wrong). Returns the paths checked.
    """
    if dataset_path not in LOCAL_FORMATS or kwargs.get("data_files") is None:
        return []
    paths = _data_file_paths(kwargs["data_files"])
    for path in paths:
        if not path.exists():
            raise TaskError(f"Task {task!r}: data file {path} does not exist (relative paths are read from "
                            f"{Path.cwd()}).")
        if path.is_dir():
            raise TaskError(f"Task {task!r}: data file {path} is a directory; name the files (a glob works).")
        if path.suffix in (".gz", ".bz2", ".xz", ".zst", ".zip"):
            continue
        if path.stat().st_size == 0:
            raise TaskError(f"Task {task!r}: data file {path} is empty.")
        _check_utf8(task, path)
        if dataset_path == "json" and path.stat().st_size <= _CHECK_RECORDS_UP_TO:
            _check_json_records(task, path, kwargs.get("field"))
        elif (dataset_path == "csv" and path.stat().st_size <= _CHECK_RECORDS_UP_TO
              and not path.read_text(encoding="utf-8").strip()):
            raise TaskError(f"Task {task!r}: data file {path} has no rows (only whitespace).")
    return paths


class Task:
    """A loaded task: its documents, its prompt construction and its few-shot sampler.

    Prompt strings follow lm-eval 0.4.13 exactly: ``description`` then, per demonstration,
    ``text + target_delimiter + target + fewshot_delimiter`` (with ``gen_prefix`` before the
    target), then the document's text (and its ``gen_prefix``). A choice's continuation is
    ``target_delimiter + choice``. A multiple-input task gives one prompt per context. With a
    :class:`~hfx.evaluation.chat.PromptFormat` the same turns get a system instruction and are
    rendered by the tokenizer's chat template (:mod:`.chat`).
    """

    def __new__(cls, config: TaskConfig | None = None, dataset=None):
        # a loaded ``class:`` (--allow-code) is run through its lm-eval object: see .class_tasks
        if cls is Task and config is not None and isinstance(config.extra.get("class"), type):
            from .class_tasks import ClassTask

            cls = ClassTask
        return super().__new__(cls)

    def __init__(self, config: TaskConfig, dataset=None):
        self.config = config
        # before the !function check: code hfx could not use anyway is refused for what it is
        check_scoring_keys(config)
        self.filters = build_pipelines(config.filter_list, config.task)
        unsafe = find_unsafe(dataclasses.asdict(config))
        if unsafe is None:
            unsafe = find_unsafe(config.extra)
        if unsafe is not None:
            raise TaskError(
                f"Task {config.task!r} ({unsafe.path}) uses `{unsafe!r}`, which runs Python code from the task "
                "directory. Re-run with --allow-code (allow_code=True) if you trust it."
            )
        fs = dict(config.fewshot_config or {})
        self.fewshot = {
            "sampler": fs.get("sampler", "default"),
            "split": fs.get("split", config.fewshot_split),
            "samples": fs.get("samples"),
            "process_docs": fs.get("process_docs", config.process_docs),
            "doc_to_text": fs.get("doc_to_text", config.doc_to_text),
            "doc_to_target": fs.get("doc_to_target", config.doc_to_target),
            "doc_to_choice": fs.get("doc_to_choice", config.doc_to_choice),
            "target_delimiter": fs.get("target_delimiter", config.target_delimiter),
            "fewshot_delimiter": fs.get("fewshot_delimiter", config.fewshot_delimiter),
            "gen_prefix": fs.get("gen_prefix", config.gen_prefix),
        }
        self._dataset = dataset
        self._features: set[str] = set()
        self._probed: dict[str, bool] = {}
        self.prompt_format: PromptFormat | None = None  # set by contexts(): how the prompts were built
        self.doc_index: int | None = None  # the document being rendered or scored, named when a hook raises

    @property
    def name(self) -> str:
        return self.config.task

    @property
    def output_type(self) -> str:
        return self.config.output_type

    # -- hooks --------------------------------------------------------------------------------
    def call(self, hook: str, fn: Callable, *args):
        """Run a task-file Python hook; whatever it raises becomes one TaskError naming task, hook and document."""
        try:
            return fn(*args)
        except TaskError:
            raise
        except Exception as exc:
            where = f", document {self.doc_index}" if self.doc_index is not None else ""
            what = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}".lstrip(".")
            code = getattr(fn, "__code__", None)
            if code is not None:  # the file a user opens, not the module name hfx gave it
                what += f" ({code.co_filename}:{code.co_firstlineno})"
            text = " ".join(str(exc).split())[:300]
            raise TaskError(f"Task {self.name!r}{where}: the `{hook}` hook {what} raised "
                            f"{type(exc).__name__}: {text}") from exc

    # -- data ---------------------------------------------------------------------------------
    @property
    def dataset(self):
        if self._dataset is None and callable(self.config.custom_dataset):
            # lm-eval calls it with the task's metadata and dataset_kwargs as keyword arguments
            kwargs = {**(self.config.metadata or {}), **(self.config.dataset_kwargs or {})}
            self._dataset = self.call("custom_dataset", lambda: self.config.custom_dataset(**kwargs))
        if self._dataset is None:
            import datasets

            kwargs = dict(self.config.dataset_kwargs or {})
            kwargs.pop("trust_remote_code", None)
            files = check_data_files(self.name, self.config.dataset_path, kwargs)
            try:
                self._dataset = datasets.load_dataset(self.config.dataset_path, self.config.dataset_name, **kwargs)
            except Exception as exc:
                cause = exc.__cause__ if exc.__cause__ is not None and "generating the dataset" in str(exc) else exc
                where = f" (data files: {', '.join(str(f) for f in files[:3])}{', ...' if len(files) > 3 else ''})"
                raise TaskError(
                    f"Task {self.name!r}: could not load dataset {self.config.dataset_path!r}"
                    f"{'/' + self.config.dataset_name if self.config.dataset_name else ''}{where if files else ''}: "
                    f"{type(cause).__name__}: {' '.join(str(cause).split())}"
                ) from exc
        return self._dataset

    def _split(self, split: str, process: Callable | None = None) -> list[dict]:
        if split not in self.dataset:
            raise TaskError(f"Task {self.name!r}: split {split!r} not in the dataset; it has {list(self.dataset)}.")
        docs = self.dataset[split]
        if process is not None:
            docs = self.call("process_docs", process, docs)
        if hasattr(docs, "features"):
            self._features |= set(docs.features)
        return list(docs)

    def eval_docs(self) -> list[dict]:
        """The documents scored: the test split if the task has one, else validation (as lm-eval)."""
        split = self.config.test_split or self.config.validation_split
        if split is None:
            raise TaskError(f"Task {self.name!r} has neither test_split nor validation_split.")
        return self._split(split, self.config.process_docs)

    def fewshot_docs(self) -> list[dict]:
        """The pool demonstrations are drawn from, chosen by lm-eval's precedence."""
        if self.fewshot["split"] is not None:
            return self._split(self.fewshot["split"], self.fewshot["process_docs"])
        samples = self.fewshot["samples"]
        if samples is not None:
            samples = self.call("fewshot_config.samples", samples) if callable(samples) else samples
            if not isinstance(samples, (list, tuple)):
                raise TaskError(f"Task {self.name!r}: fewshot_config.samples must be a list of documents or a "
                                f"function returning one, got {type(samples).__name__}.")
            return list(samples)
        for split in (self.config.training_split, self.config.validation_split, self.config.test_split):
            if split is not None:
                return self._split(split, self.config.process_docs)
        return []

    @property
    def fewshot_excludes_eval_doc(self) -> bool:
        """lm-eval removes the evaluated doc from its demonstrations only when fewshot split == test split."""
        return self.fewshot["split"] == self.config.test_split

    def _first_doc(self, what: str, render: Callable):
        """What lm-eval decides once from the first evaluated document (``multiple_input`` / ``multiple_target``)."""
        if what not in self._probed:
            docs = self.eval_docs()
            if not docs:
                raise TaskError(f"Task {self.name!r} has no documents to evaluate.")
            index, self.doc_index = self.doc_index, 0
            try:
                self._probed[what] = render(docs[0])
            finally:
                self.doc_index = index
        return self._probed[what]

    @property
    def multiple_input(self) -> bool:
        """doc_to_text gives the index of the gold context among the doc_to_choice contexts (winogrande)."""
        if self.config.doc_to_choice is None:
            return False
        return self._first_doc("multiple_input", lambda doc: type(self.doc_to_text(doc)) is int)

    @property
    def multiple_target(self) -> bool:
        """doc_to_target gives a list of answers (any of them counts)."""
        return self._first_doc("multiple_target", lambda doc: isinstance(self.doc_to_target(doc), list))

    # -- rendering ----------------------------------------------------------------------------
    def _is_field(self, spec: str, doc: dict) -> bool:
        return spec in (self._features or doc.keys())

    def doc_to_text(self, doc: dict, spec: Any = None) -> str | int:
        spec = self.config.doc_to_text if spec is None else spec
        if isinstance(spec, int):
            return spec
        if callable(spec):
            return self.call("doc_to_text", spec, doc)
        if not isinstance(spec, str):
            raise TaskError(f"Task {self.name!r}: doc_to_text must be a field, template or function, got {spec!r}.")
        if self._is_field(spec, doc):
            return doc[spec]
        text = render(spec, doc, where=f"Task {self.name!r}: doc_to_text")
        return ast.literal_eval(text) if text.isdigit() and self.config.doc_to_choice is not None else text

    def doc_to_target(self, doc: dict, spec: Any = None) -> str | int | list:
        spec = self.config.doc_to_target if spec is None else spec
        if isinstance(spec, (int, list)):
            return spec
        if callable(spec):
            return self.call("doc_to_target", spec, doc)
        if not isinstance(spec, str):
            raise TaskError(f"Task {self.name!r}: doc_to_target must be a field, template or function, got {spec!r}.")
        if self._is_field(spec, doc):
            return doc[spec]
        text = render(spec, doc, where=f"Task {self.name!r}: doc_to_target")
        if text.isdigit() and self.config.doc_to_choice is not None:
            return ast.literal_eval(text)
        if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (SyntaxError, ValueError):
                return text
        return text

    def doc_to_choice(self, doc: dict, spec: Any = None) -> list[str]:
        spec = self.config.doc_to_choice if spec is None else spec
        if isinstance(spec, list):
            return spec
        if isinstance(spec, dict):
            return list(spec.values())
        if callable(spec):
            return self.call("doc_to_choice", spec, doc)
        if not isinstance(spec, str):
            raise TaskError(f"Task {self.name!r}: doc_to_choice must be a field, template, list or function.")
        if self._is_field(spec, doc):
            return doc[spec]
        text = render(spec, doc, where=f"Task {self.name!r}: doc_to_choice")
        try:
            return ast.literal_eval(text)
        except (SyntaxError, ValueError) as exc:
            raise TaskError(f"Task {self.name!r}: doc_to_choice rendered {text!r}, which is not a Python list.") from exc

    def _resolve(self, spec: Any, doc: dict, what: str, fields: bool = False) -> str:
        """lm-eval's ``resolve_field``: a document field by that name, else a template."""
        if not spec:
            return ""
        if not isinstance(spec, str):
            raise TaskError(f"Task {self.name!r}: {what} must be a field name or a template string, got {spec!r}.")
        if (self._is_field(spec, doc) if fields else spec in doc):
            return doc[spec]
        return render(spec, doc, where=f"Task {self.name!r}: {what}")

    def description_for(self, doc: dict) -> str:
        return self._resolve(self.config.description, doc, "description")

    def gen_prefix_for(self, doc: dict, *, fewshot: bool = False) -> str:
        """The text written after ``doc``'s prompt (or before a demonstration's answer); "" if none."""
        if fewshot:
            return self._resolve(self.fewshot["gen_prefix"], doc, "fewshot_config.gen_prefix")
        if self.config.gen_prefix is None:
            return ""
        return self._resolve(self.config.gen_prefix, doc, "gen_prefix", fields=True) if self.config.gen_prefix \
            else ""

    def target_text(self, doc: dict, *, fewshot: bool = False) -> str:
        """The answer string of ``doc`` as shown in a demonstration."""
        cfg = self.fewshot if fewshot else {}
        target = self.doc_to_target(doc, cfg.get("doc_to_target"))
        if isinstance(target, int) and (self.config.doc_to_choice is not None or cfg.get("doc_to_choice")):
            return self.doc_to_choice(doc, cfg.get("doc_to_choice"))[target]
        if isinstance(target, list):
            return target[0]
        return target if isinstance(target, str) else str(target)

    def _qa_turn(self, q: Any, choices: list | None, answer: Any, gen_prefix: str, target_delimiter: str,
                 fewshot_delimiter: str) -> list[Message]:
        """One question (and its answer, or the open ``gen_prefix``) as lm-eval's ``build_qa_turn`` makes it."""
        if not isinstance(q, str):
            raise TaskError(f"Task {self.name!r}: doc_to_text must give a string here, got {q!r}.")
        has_answer = answer is not None and not (isinstance(answer, str) and answer == "")
        needs_delimiter = bool(gen_prefix) and bool(q) and not (q[-1].isspace() or gen_prefix[0].isspace())
        turns = [Message("user", q, target_delimiter if (has_answer and not gen_prefix) or needs_delimiter else "")]
        if has_answer:
            if choices and isinstance(answer, int):
                answer = choices[answer]
            elif isinstance(answer, list):
                answer = answer[0]
            if not isinstance(answer, str):
                raise TaskError(f"Task {self.name!r}: a demonstration's answer must be a string (or an index into "
                                f"doc_to_choice), got {answer!r}.")
            turns.append(Message("assistant", join_delimited(gen_prefix, answer), fewshot_delimiter))
        elif gen_prefix:
            turns.append(Message("assistant", gen_prefix))
        return turns

    def _turn(self, q: Any, choices: list | None, answer: Any, gen_prefix: str, target_delimiter: str,
              fewshot_delimiter: str) -> str:
        """One question (and answer) as plain text."""
        return messages_text(self._qa_turn(q, choices, answer, gen_prefix, target_delimiter, fewshot_delimiter))

    def _demonstration_turns(self, demo: dict) -> list[Message]:
        fs = self.fewshot
        q = self.doc_to_text(demo, fs["doc_to_text"])
        choices = self.doc_to_choice(demo, fs["doc_to_choice"]) if fs["doc_to_choice"] else None
        answer = self.doc_to_target(demo, fs["doc_to_target"])
        if self.multiple_input:  # the gold context, then the shared continuation
            q, choices = choices[q], None
        return self._qa_turn(q, choices, answer, self.gen_prefix_for(demo, fewshot=True), fs["target_delimiter"],
                             fs["fewshot_delimiter"])

    def _demonstration(self, demo: dict) -> str:
        return messages_text(self._demonstration_turns(demo))

    def context(self, doc: dict, demonstrations: Sequence[dict],
                prompt_format: PromptFormat | None = None) -> str | list[str]:
        """The prompt for ``doc`` preceded by ``demonstrations`` (already sampled); a list for multiple inputs.

        ``prompt_format`` (:func:`.chat.prompt_format`) adds a system instruction and renders the
        turns with a chat template; ``None`` gives lm-eval's plain-text prompt.
        """
        gen_prefix = self.gen_prefix_for(doc)
        if prompt_format is None:  # the plain-text prompt, built without message objects (the common path)
            prefix = self.description_for(doc) + "".join(self._demonstration(demo) for demo in demonstrations)
            if self.multiple_input:
                return [prefix + self._turn(c, None, None, gen_prefix, "", "") for c in self._input_contexts(doc)]
            return prefix + self._turn(self.doc_to_text(doc), None, None, gen_prefix, self.config.target_delimiter, "")
        system = prompt_format.system_prompt(self.description_for(doc), self.config.fewshot_delimiter)
        history = [Message("system", system)] if system else []
        for demo in demonstrations:
            history += self._demonstration_turns(demo)
        if self.multiple_input:
            return [self._render(prompt_format, history + self._qa_turn(c, None, None, gen_prefix, "", ""), gen_prefix)
                    for c in self._input_contexts(doc)]
        final = self._qa_turn(self.doc_to_text(doc), None, None, gen_prefix, self.config.target_delimiter, "")
        return self._render(prompt_format, history + final, gen_prefix)

    def _input_contexts(self, doc: dict) -> list:
        contexts = self.doc_to_choice(doc)
        if not isinstance(contexts, list):
            raise TaskError(f"Task {self.name!r}: a multiple-input task needs doc_to_choice to give a list of "
                            f"contexts, got {contexts!r}.")
        return contexts

    def _render(self, prompt_format: PromptFormat, messages: list[Message], gen_prefix: str) -> str:
        try:
            return prompt_format.render(messages, gen_prefix)
        except TaskError:
            raise
        except Exception as exc:
            where = f", document {self.doc_index}" if self.doc_index is not None else ""
            raise TaskError(f"Task {self.name!r}{where}: the chat template failed: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from exc

    def contexts(self, docs: Sequence[dict], num_fewshot: int, seed: int | None = 1234,
                 prompt_format: PromptFormat | None = None) -> list[str | list[str]]:
        """Prompts for ``docs`` in order, demonstrations drawn as lm-eval draws them for ``seed``.

        ``prompt_format`` is remembered on the task (``self.prompt_format``): a chat template also
        changes what separates a multiple-choice prompt from its choices.
        """
        self.prompt_format = prompt_format
        sampler = None
        if num_fewshot > 0:
            sampler = get_sampler(self.fewshot["sampler"])(self.fewshot_docs(), random.Random(seed))
        exclude = self.fewshot_excludes_eval_doc
        out = []
        for i, doc in enumerate(docs):
            self.doc_index = i
            demos = sampler.sample(num_fewshot, doc if exclude else None) if sampler is not None else []
            out.append(self.context(doc, demos, prompt_format))
        self.doc_index = None
        return out

    def choice_delimiter(self) -> str:
        """What separates a multiple-choice prompt from each choice: ``target_delimiter``, or lm-eval's rule under a
        chat template (see :meth:`.chat.PromptFormat.choice_delimiter`)."""
        fmt = self.prompt_format
        if fmt is None:
            return self.config.target_delimiter
        return fmt.choice_delimiter(self.config.target_delimiter, self.config.gen_prefix)

    def validate(self, num_fewshot: int, docs: Sequence[dict] | None = None) -> None:
        """Render the first document (and a demonstration) so template and pool errors surface before the model runs."""
        docs = self.eval_docs() if docs is None else docs
        if not docs:
            raise TaskError(f"Task {self.name!r} has no documents to evaluate.")
        from .output_types import metric_specs  # metric_list checked too (a hub metric, an unknown aggregation)

        metric_specs(self)
        doc = docs[0]
        self.doc_index = 0
        self.doc_to_text(doc)
        if self.config.doc_to_choice is not None:
            choices = self.doc_to_choice(doc)
            if not isinstance(choices, list) or not choices:
                raise TaskError(f"Task {self.name!r}: doc_to_choice must give a non-empty list, got {choices!r}.")
        if self.config.output_type != "loglikelihood_rolling":
            self.doc_to_target(doc)
        if num_fewshot > 0:
            pool = self.fewshot_docs()
            available = len(pool) - (1 if self.fewshot_excludes_eval_doc else 0)
            if num_fewshot > available:
                raise TaskError(
                    f"Task {self.name!r}: num_fewshot={num_fewshot} but the few-shot pool has only {available} "
                    f"documents{' (the evaluated one excluded)' if self.fewshot_excludes_eval_doc else ''}."
                )
            self.context(doc, pool[:1])
        self.doc_index = None

    def effective_num_fewshot(self, requested: int | None) -> int:
        """lm-eval's rule: a request overrides the config, except a config that pins 0 shots."""
        configured = self.config.num_fewshot
        if requested is not None and configured != 0:
            return requested
        return configured or 0

    @property
    def version(self) -> Any:
        return (self.config.metadata or {}).get("version", "Yaml")

    def __repr__(self) -> str:
        return f"Task({self.name!r}, output_type={self.output_type!r}, source={self.config.source!r})"
