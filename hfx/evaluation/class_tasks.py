"""Python ``class:`` tasks: lm-eval Task subclasses, run as lm-eval's evaluator runs them, scored by hfx.

A task file with ``class: !function task.MyTask`` (``--allow-code``) names an lm-eval 0.4.13
``Task`` subclass. hfx builds it as lm-eval's task factory does (``cls(config=<the merged task
file>)``, or ``cls()`` when its constructor takes no config; the class loads its own data), sets
``num_fewshot`` and the few-shot seed as ``simple_evaluate`` does, and lets the object build its
requests (``build_all_requests``). Only the answers differ in origin: hfx's
:class:`~hfx.evaluation.scorer.CausalLMScorer` answers each ``loglikelihood`` /
``loglikelihood_rolling`` / ``generate_until`` request (``repeats`` copies each, as lm-eval).
Then the object's filters, ``process_results`` per document and filter, and its ``aggregation()``
/ ``higher_is_better()`` give the scores, with lm-eval's stderr rules (:func:`.metrics.aggregate`).

A class runs when ``lm_eval`` is importable and every lm-eval method it overrides is in
:data:`PUBLIC_TASK_API` (what lm-eval's evaluator calls back, plus its documented override
points); a class overriding lm-eval's request building, filtering or document iteration
(``build_all_requests``, ``apply_filters``, ``doc_iterator``, ``build_qa_turn``, ...) is refused
naming the class and those methods, since hfx relies on them. These checks read the class only:
validation never instantiates it (instantiating downloads its data).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

from .templates import TaskError, UnsafeFunction

CLASS_OUTPUT_TYPE = "class"
INSTALL_HINT = 'pip install "hfx[lm-eval]"'
# lm-eval methods a ``class:`` task may override: the data, prompt, request and scoring API its
# evaluator calls, and ``_process_doc`` (lm-eval's documented per-document hook, never called by it)
PUBLIC_TASK_API = frozenset({
    "__init__", "download", "has_training_docs", "has_validation_docs", "has_test_docs", "training_docs",
    "validation_docs", "test_docs", "fewshot_docs", "fewshot_examples", "_process_doc", "doc_to_text",
    "doc_to_target", "doc_to_choice", "doc_to_prefix", "should_decontaminate", "doc_to_decontamination_query",
    "fewshot_context", "construct_requests", "process_results", "aggregation", "higher_is_better", "count_bytes",
    "count_words",
})
# class attributes of lm-eval's Task that a subclass sets as data (abc adds ``_abc_impl`` to each class)
_DATA_ATTRIBUTES = frozenset({"VERSION", "DATASET_PATH", "DATASET_NAME", "OUTPUT_TYPE", "CONFIG", "_abc_impl"})
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def _lm_eval_task():
    """lm-eval's ``Task`` base class, or None when the optional ``lm_eval`` package is not installed."""
    try:
        from lm_eval.api.task import Task as LMTask
    except ImportError:
        return None
    return LMTask


def _lm_eval_configurable():
    try:
        from lm_eval.api.task import ConfigurableTask
    except ImportError:
        return None
    return ConfigurableTask


def class_name(cls: Any) -> str:
    if isinstance(cls, type):
        return f"{cls.__module__}.{cls.__qualname__}"
    return repr(cls).removeprefix("!function ")


def _is_lm_eval_base(klass: type) -> bool:
    return klass.__module__.split(".")[0] == "lm_eval" and klass.__module__.startswith("lm_eval.api")


def overrides(cls: type) -> tuple[list[str], list[str]]:
    """``(overridden lm-eval members, those outside PUBLIC_TASK_API)`` of ``cls``, from its class dicts only."""
    bases = [k for k in cls.__mro__ if _is_lm_eval_base(k)]
    own = [k for k in cls.__mro__ if k is not object and not _is_lm_eval_base(k)]
    base_names = {name for k in bases for name in vars(k)}
    defined = {name for k in own for name in vars(k)}
    overridden = sorted(n for n in defined & base_names
                        if n not in _DATA_ATTRIBUTES and not (n.startswith("__") and n != "__init__"))
    return overridden, [n for n in overridden if n not in PUBLIC_TASK_API]


def _refusal(config, cls, why: str) -> TaskError:
    # the prefix is the one validation groups refusals by ("class task <name>")
    return TaskError(f"Task {config.task!r} is a Python class task, `class: {class_name(cls)}`: {why}")


def check_class(config) -> None:
    """Refuse a ``class:`` task hfx cannot run as lm-eval would, naming the class; the class is not instantiated.

    A ``!function`` not loaded (no ``allow_code``) is left to the task loader's own refusal.
    """
    cls = config.extra.get("class")
    if cls is None or isinstance(cls, UnsafeFunction):
        return
    if not isinstance(cls, type):
        raise _refusal(config, cls, f"`class:` must name an lm-eval Task class, got a {type(cls).__name__}.")
    base = _lm_eval_task()
    if base is None:
        raise _refusal(config, cls, f"running an lm-eval Task class needs lm-eval 0.4.13: {INSTALL_HINT}.")
    if not issubclass(cls, base):
        raise _refusal(config, cls, "it is not a subclass of lm-eval's lm_eval.api.task.Task, so hfx cannot drive "
                                    "it as lm-eval's evaluator does.")
    overridden, offending = overrides(cls)
    if offending:
        raise _refusal(config, cls, f"it overrides lm-eval internals {', '.join(offending)}, which hfx relies on to "
                                    "run it as lm-eval does; a class task may override only lm-eval's public task "
                                    f"API ({', '.join(sorted(PUBLIC_TASK_API))}).")
    configurable = _lm_eval_configurable()
    if (configurable is not None and issubclass(cls, configurable) and cls.__init__ is configurable.__init__
            and getattr(cls, "CONFIG", None) is None):
        raise _refusal(config, cls, "its constructor is lm-eval's ConfigurableTask.__init__, which lm-eval's task "
                                    "factory calls with the whole task file, `class` key included, and lm-eval's "
                                    "TaskConfig rejects that key (lm-eval fails on it too); give the class its own "
                                    "__init__ (or a CONFIG).")
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise _refusal(config, cls, f"it does not implement lm-eval's abstract methods {', '.join(missing)} "
                                    "(lm-eval cannot instantiate it either).")


def _ctor_takes_config(cls: type) -> bool:
    try:
        return "config" in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False


def _factory_config(config) -> dict:
    """The dict lm-eval's factory passes to ``cls(config=...)``: the merged task file, structural keys dropped."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(config):
        if f.name in ("extra", "source", "tag"):
            continue
        value = getattr(config, f.name)
        if value is not None:
            out[f.name] = value
    out.update({k: v for k, v in config.extra.items() if k not in ("group", "task_list")})
    metadata = out.get("metadata")
    out["metadata"] = {**(metadata if isinstance(metadata, dict) else {} if metadata is None else
                          {"_metadata": metadata}), "config_source": config.source or "inline"}
    return out


def _task_base():
    from .tasks import Task

    return Task


class ClassTask(_task_base()):
    """A :class:`~hfx.evaluation.tasks.Task` whose documents, requests and scores come from an lm-eval Task object.

    ``Task(config)`` returns one for a config whose ``class`` is a loaded class. Checks happen in the
    constructor; the lm-eval object is built on first use of the documents (``eval_docs``).
    """

    def __init__(self, config, dataset=None):
        super().__init__(config, dataset)
        self.task_class = config.extra["class"]
        self.__dict__["_metric_specs"] = {}  # metric names are the class's own, known after scoring
        self._object = None
        self._requests: dict[int, list] = {}
        self._limit: int | None = None

    @property
    def output_type(self) -> str:
        return CLASS_OUTPUT_TYPE

    @property
    def lm_task(self):
        """The lm-eval Task object, built as lm-eval's task factory builds it (this loads its data)."""
        if self._object is None:
            cls = self.task_class

            try:
                obj = cls(config=_factory_config(self.config)) if _ctor_takes_config(cls) else cls()
            except TaskError:
                raise
            except Exception as exc:
                text = " ".join(str(exc).split())[:300]
                raise TaskError(f"Task {self.name!r}: building `class: {class_name(cls)}` (as lm-eval's task factory "
                                f"does; this loads its data) raised {type(exc).__name__}: {text}") from exc
            if hasattr(obj, "config") and hasattr(obj.config, "task"):
                obj.config.task = self.name
            self._object = obj
        return self._object

    def eval_docs(self) -> list[dict]:
        return list(self.call("eval_docs", lambda: self.lm_task.eval_docs))

    def effective_num_fewshot(self, requested: int | None) -> int:
        """lm-eval's rule, on the object's own config (a class may replace the task file's)."""
        configured = self.lm_task.get_config("num_fewshot")
        if requested is not None and configured != 0:
            return requested
        return configured or 0

    def validate(self, num_fewshot: int, docs=None) -> None:
        docs = self.eval_docs() if docs is None else docs
        if not docs:
            raise TaskError(f"Task {self.name!r} has no documents to evaluate.")

    def contexts(self, docs, num_fewshot: int, seed: int | None = 1234, prompt_format=None) -> list:
        """Build the object's requests (as ``simple_evaluate`` then ``evaluate`` do); the first prompt per document.

        A ``prompt_format`` (:mod:`.chat`) is handed to the object as lm-eval's evaluator hands it the chat options.
        """
        obj = self.lm_task
        obj.set_config(key="num_fewshot", value=num_fewshot)
        obj.set_fewshot_seed(seed=seed)
        self._limit = len(docs)
        self.prompt_format = prompt_format
        chat = {} if prompt_format is None else prompt_format.lm_eval_options()
        self.call("build_all_requests", lambda: obj.build_all_requests(limit=self._limit, **chat))
        self._requests = defaultdict(list)
        for instance in obj.instances:
            if instance.request_type not in REQUEST_TYPES:
                raise TaskError(f"Task {self.name!r}: {class_name(self.task_class)}.construct_requests made a "
                                f"{instance.request_type!r} request; a language model answers only "
                                f"{', '.join(REQUEST_TYPES)}.")
            gen = instance.args[1] if instance.request_type == "generate_until" and len(instance.args) > 1 else {}
            if (instance.repeats or 1) > 1 and isinstance(gen, dict) and gen.get("do_sample"):
                raise TaskError(f"Task {self.name!r}: repeats={instance.repeats} with do_sample: true samples several "
                                "answers; hfx decodes each request once, so its numbers would differ from lm-eval's.")
            self._requests[instance.doc_id].append(instance)
        for requests in self._requests.values():
            requests.sort(key=lambda r: r.idx)
        return [self._requests[i][0].args[0] if self._requests.get(i) else None for i in range(len(docs))]

    def metric_directions(self) -> dict:
        """The object's ``higher_is_better()``, as lm-eval's results report it."""
        return dict(self.call("higher_is_better", self.lm_task.higher_is_better) or {})

    @property
    def version(self) -> Any:
        if self._object is not None:
            return self._object.VERSION
        return super().version


def _answer(task: ClassTask, backend) -> None:
    """Every request answered by ``backend``, by request type in lm-eval's order; ``repeats`` copies each."""
    by_type: dict[str, list] = defaultdict(list)
    for instance in task.lm_task.instances:
        instance.resps, instance.filtered_resps = [], {}
        by_type[instance.request_type].append(instance)
    for request_type, requests in by_type.items():
        if request_type == "loglikelihood":
            answers = [tuple(a) for a in backend.loglikelihood([tuple(r.args[:2]) for r in requests], task.name)]
        elif request_type == "loglikelihood_rolling":
            answers = backend.loglikelihood_rolling([r.args[0] for r in requests])
        else:
            answers = backend.generate_until([(r.args[0], dict(r.args[1]) if len(r.args) > 1 else {})
                                              for r in requests])
        for request, answer in zip(requests, answers, strict=True):
            request.resps.extend([answer] * (request.repeats or 1))


def run_class_task(task: ClassTask, docs, contexts, backend) -> list[dict]:
    """Per-document records (per filter), scored by the object's ``process_results``, as lm-eval's evaluator."""
    obj = task.lm_task
    _answer(task, backend)
    task.call("apply_filters", obj.apply_filters)
    records = []
    first = obj.instances[0]
    for key in first.filtered_resps:
        for doc_id, doc in obj.doc_iterator(limit=task._limit):
            task.doc_index = doc_id
            requests = task._requests[doc_id]
            filtered = [r.filtered_resps[key] for r in requests]
            metrics = task.call("process_results", obj.process_results, doc, filtered)
            if not isinstance(metrics, dict):
                raise TaskError(f"Task {task.name!r}, document {doc_id}: process_results must return a dict of "
                                f"metric values, got {type(metrics).__name__}.")
            records.append({"doc_id": doc_id, "doc": doc, "target": task.call("doc_to_target", obj.doc_to_target, doc),
                            "arguments": [list(r.args) for r in requests], "resps": [r.resps for r in requests],
                            "filter": key, "filtered_resps": filtered, "metrics": metrics})
    task.doc_index = None
    _record_aggregations(task, records)
    return records


def _record_aggregations(task: ClassTask, records: list[dict]) -> None:
    """The object's aggregation() / higher_is_better() as metric specs (a key without aggregation: lm-eval's mean)."""
    from .output_types import MetricSpec

    obj = task.lm_task
    aggregations = dict(task.call("aggregation", obj.aggregation) or {})
    directions = task.metric_directions()
    keys = list(dict.fromkeys([*directions, *(k for r in records for k in r["metrics"])]))
    task.__dict__["_metric_aliases"] = {
        key: MetricSpec(key, aggregation=aggregations.get(key, "mean"), higher_is_better=directions.get(key))
        for key in keys
    }


def check_backend(task, docs, backend) -> None:
    missing = [m for m in REQUEST_TYPES if not callable(getattr(backend, m, None))]
    if missing:
        raise TaskError(f"Task {task.name!r} is an lm-eval class task; its requests need a causal LM backend "
                        f"({', '.join(missing)} missing on {type(backend).__name__}).")
