"""Safe reading of task files: YAML through a bounded safe loader, Jinja through a bounded sandbox.

lm-evaluation-harness task files are data, but some of their features can run code or unbounded
work:

- Jinja templates render in a subclass of :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`
  (which refuses attribute tricks such as ``{{ ''.__class__ }}``) that also enforces
  :data:`TEMPLATE_LIMITS`: loop iterations and calls, the size of every string or list a template
  builds (``'a' * 10**9``, ``center``, ``replace``, ``join``, ``format`` widths, ...), the text it
  writes, integer sizes and wall time. A template over a limit fails with
  :class:`TemplateLimitError` (a :class:`TaskError`) naming the task and field.
- YAML is parsed by a safe loader that refuses files over :data:`MAX_YAML_BYTES`, documents that
  hold or expand (aliases counted) to more than :data:`MAX_YAML_NODES` nodes (counted as they are
  read, so reading stops at the limit), and aliases that contain themselves, before any Python
  object is built.
- The ``!function module.name`` tag imports a Python file. It is resolved only when the caller
  passes ``allow_code=True`` (``hfx eval --allow-code``), and only from a file inside the task's
  folder tree (``a.b.f`` is ``a/b.py`` next to the YAML) or, when no such file exists, from an
  installed module (``lm_eval.filters.extraction``); otherwise loading the task fails and says why.
"""

from __future__ import annotations

import _string
import contextvars
import functools
import importlib.util
import re
import string
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import yaml
from jinja2 import StrictUndefined, nodes
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg, pass_context
from jinja2.visitor import NodeTransformer


class TaskError(ValueError):
    """A task file or its data cannot be used; raised before any model runs."""


class TemplateLimitError(TaskError):
    """A template exceeded :data:`TEMPLATE_LIMITS` (loop steps, size of a value it builds, or time)."""


class TemplateSecurityError(TaskError, SecurityError):
    """A template tried something the sandbox forbids (attribute tricks, mutating a list, ...)."""


@dataclass
class TemplateLimits:
    """Bounds on the work one rendering of one template may do.

    ``max_steps``: loop iterations plus calls (methods, globals; a macro call counts 10, it costs
    about as much); ``max_size``: characters
    of any string it builds or writes (elements for lists, nested contents counted) beyond the size
    of the document itself; ``max_int_bits``: size of an integer it computes; ``max_seconds``: wall
    time, checked at every step, call, attribute access, operator and output. The lm-eval 0.4.13
    task files stay far below all four.
    """

    max_steps: int = 100_000
    max_size: int = 4 * 2**20
    max_int_bits: int = 2**16
    max_seconds: float = 2.0


TEMPLATE_LIMITS = TemplateLimits()


class _Budget:
    def __init__(self, where: str, extra_size: int = 0):
        limits = TEMPLATE_LIMITS
        self.where, self.limits = where, limits
        self.steps = 0
        self.emitted = 0
        self.max_size = limits.max_size + extra_size
        self.deadline = time.monotonic() + limits.max_seconds

    def fail(self, what: str) -> None:
        raise TemplateLimitError(f"{self.where}: {what}; refused to keep rendering bounded.")

    def tick(self, steps: int = 0) -> None:
        if steps:
            self.steps += steps
            if self.steps > self.limits.max_steps:
                self.fail(f"more than {self.limits.max_steps} loop iterations and calls")
        if time.monotonic() > self.deadline:
            self.fail(f"rendering took longer than {self.limits.max_seconds:g} s")

    def size(self, estimate: int, what: str) -> None:
        if estimate > self.max_size:
            self.fail(f"{what} would be about {estimate} characters/items, more than the limit of {self.max_size}")

    def int_bits(self, estimate: int, what: str) -> None:
        if estimate > self.limits.max_int_bits:
            self.fail(f"{what} would have about {estimate} bits, more than the limit of {self.limits.max_int_bits}")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("hfx_template_budget", default=None)


def _budget() -> _Budget:
    # outside render() (Jinja folding constants while compiling) a fresh budget applies
    return _BUDGET.get() or _Budget("template")


def _weight(value: Any, limit: int) -> int:
    """Characters and items ``value`` holds, nested contents included; stops counting past ``limit``."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 1
        else:
            total += 1
    return total


def _shallow(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else 0


_NUMBER = re.compile(r"\d+")


def _check_ints(budget: _Budget, args: tuple, kwargs: dict, what: str) -> None:
    """Integer arguments (widths, counts, repetitions) above the size limit are refused."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and value > budget.max_size:
            budget.size(value, f"{what} with argument {value}")


def _width(budget: _Budget, number: str | int, what: str) -> int:
    """A width or precision (digits of a format spec, or a ``*`` argument) within the size limit."""
    written = str(number)[:20]
    if isinstance(number, str):
        number = int(number[:13])
    if abs(number) > budget.max_size:
        budget.size(abs(number), f"{what} with a width of {written}")
    return abs(number)


# one %-conversion: (mapping key), flags, width, .precision, length modifier, type
_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*?(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.DOTALL)
_FORMATTER = string.Formatter()
_CONVERSIONS = {"r": repr, "s": str, "a": ascii}


def _check_percent(budget: _Budget, fmt: str, right: Any, what: str) -> None:
    """``fmt % right`` (the operator and the ``format`` filter): every width and precision, ``*`` ones
    taken from the arguments, within the limit, and their sum with the arguments' size too."""
    args = right if isinstance(right, tuple) else (right,)
    total, position = len(fmt), 0
    for match in _PERCENT.finditer(fmt):
        key, width, precision, kind = match.groups()
        if kind == "%":
            continue
        for number in (width, precision):
            if number == "*":
                star = args[position] if position < len(args) else None
                position += 1
                if isinstance(star, int) and not isinstance(star, bool):  # anything else: the call raises
                    total += _width(budget, star, what)
            elif number:
                total += _width(budget, number, what)
        position += key is None
    budget.size(total + _weight(right, budget.max_size), what)


def _check_str_format(budget: _Budget, fmt: str, args: tuple, kwargs: Any, what: str) -> None:
    """``fmt.format(*args, **kwargs)`` / ``fmt.format_map(kwargs)``, before it runs: every width and
    precision within the limit, nested ``{...}`` ones resolved against the arguments (items and
    attributes through the sandbox), and their sum with the arguments' size too."""
    total, auto = 0, 0

    def value_of(name: str):
        nonlocal auto
        first, rest = _string.formatter_field_name_split(name)
        if first == "":
            first, auto = auto, auto + 1
        value = args[first] if isinstance(first, int) else kwargs[first]
        for is_attr, key in rest:
            value = _ENV.getattr(value, key) if is_attr else _ENV.getitem(value, key)
        return value

    try:
        for literal, name, spec, _conversion in _FORMATTER.parse(fmt):
            total += len(literal)
            if name is None:
                continue
            if _string.formatter_field_name_split(name)[0] == "":
                auto += 1  # the field's own value; only nested fields (widths) are resolved
            if spec and "{" in spec:
                pieces = []
                for inner_literal, inner_name, inner_spec, conversion in _FORMATTER.parse(spec):
                    pieces.append(inner_literal)
                    if inner_name is not None:
                        for number in _NUMBER.findall(inner_spec or ""):
                            _width(budget, number, what)
                        value = value_of(inner_name)
                        pieces.append(format(_CONVERSIONS[conversion](value) if conversion else value, inner_spec))
                spec = "".join(pieces)
            total += sum(_width(budget, number, what) for number in _NUMBER.findall(spec or ""))
    except TaskError:
        raise
    except (ValueError, LookupError, TypeError, AttributeError):
        pass  # a malformed string or a missing argument: the call itself raises the same error
    budget.size(total + _weight((args, kwargs), budget.max_size), what)


def _estimate_replace(s: str, old: str, new: str, count: int | None = None) -> int:
    occurrences = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        occurrences = min(occurrences, count)
    return len(s) + occurrences * max(len(new) - len(old), 0)


def _estimate_join(budget: _Budget, sep: str, items: Any) -> int:
    return _weight(items, budget.max_size) + len(sep) * max(_shallow(items) - 1, 0)


_MATERIALISED = (str, bytes, list, tuple, dict, set, frozenset)


def _materialise(value: Any) -> Any:
    """A generator (``map``, ``select``, ...) as a list, so that its size can be estimated and it is read once."""
    if isinstance(value, _MATERIALISED) or not hasattr(value, "__iter__"):
        return value
    return list(_steps(value))


# per-filter size estimates of the result, from the arguments (after any Jinja pass-arg)
def _filter_estimate(budget: _Budget, name: str, args: tuple, kwargs: dict) -> int | None:
    value = args[0] if args else None
    rest = args[1:]
    if name == "format" and isinstance(value, str):
        _check_percent(budget, value, kwargs or tuple(rest), "the format filter")  # Jinja's format is '%'
        return None
    if name == "replace" and isinstance(value, str) and len(rest) >= 2:
        return _estimate_replace(value, str(rest[0]), str(rest[1]), rest[2] if len(rest) > 2 else kwargs.get("count"))
    if name == "join":
        sep = rest[0] if rest else kwargs.get("d", "")
        return _estimate_join(budget, str(sep), value)
    if name == "indent" and isinstance(value, str):
        width = rest[0] if rest else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else int(width)
        return len(value) + (value.count("\n") + 1) * max(width, 0)
    if name == "wordwrap" and isinstance(value, str):
        wrap = (rest[3] if len(rest) > 3 else kwargs.get("wrapstring")) or "\n"
        return len(value) * (1 + len(str(wrap)))
    if name == "sum":
        return _weight((value, kwargs.get("start"), rest), budget.max_size)
    if name in ("string", "pprint", "tojson", "e", "escape", "forceescape", "urlize", "urlencode", "xmlattr", "list"):
        return 6 * _weight(value, budget.max_size)
    return None


def _guard_filter(name: str, func):
    """``func`` (a Jinja filter) with the size limits checked before and after it runs."""
    pass_arg = _PassArg.from_obj(func)

    @functools.wraps(func)
    def guarded(*args, **kwargs):
        budget = _budget()
        budget.tick()
        values = args[1:] if pass_arg is not None else args
        if name in ("join", "sum") and values:
            values = (_materialise(values[0]), *values[1:])
            args = (*args[:len(args) - len(values)], *values)
        _check_ints(budget, values, kwargs, f"the {name} filter")
        estimate = _filter_estimate(budget, name, values, kwargs)
        if estimate is not None:
            budget.size(estimate, f"the result of the {name} filter")
        if name in _ITERATING_FILTERS and values and hasattr(values[0], "__iter__"):
            args = (*args[:len(args) - len(values)], _timed(values[0]), *values[1:])
        result = func(*args, **kwargs)
        if isinstance(result, Iterator):  # map, select, batch, ...: each item they produce is a step
            return _steps(result)
        budget.size(_shallow(result), f"the result of the {name} filter")
        return result

    return guarded


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    """lm-eval's ``re.sub`` filter, in one pass of the ``regex`` module: the result's size is checked at
    every match and the search stops at the rendering's deadline (catastrophic backtracking included)."""
    budget = _budget()
    size = len(string)

    def expand(match):
        nonlocal size
        piece = match.expand(repl)
        size += len(piece) - (match.end() - match.start())
        budget.size(size, "the result of the regex_replace filter")
        budget.tick()
        return piece

    compiled = regex.compile(pattern)
    try:
        return compiled.sub(expand, string, count=count, timeout=max(budget.deadline - time.monotonic(), 1e-3))
    except TimeoutError:
        budget.fail(f"rendering took longer than {budget.limits.max_seconds:g} s (in regex_replace)")


def _bounded_steps(iterable):
    budget = _budget()
    for item in iterable:
        budget.tick(1)
        yield item


def _steps(iterable):
    """``iterable`` with one step counted per item it produces (once, however often it is wrapped)."""
    if getattr(iterable, "gi_code", None) is _bounded_steps.__code__:
        return iterable
    return _bounded_steps(iterable)


def _timed(iterable):
    """``iterable`` with the deadline checked at every item (a filter's own loop over its input)."""
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


# filters that only iterate over their input: they read it through _timed; filters whose result is
# lazy: it is read through _steps, so that work done inside a generator is bounded too
_ITERATING_FILTERS = frozenset({"batch", "slice", "map", "select", "reject", "selectattr", "rejectattr", "unique",
                                "list", "sum", "join", "sort", "groupby", "min", "max"})


@pass_context
def _steps_filter(context, iterable):
    return _steps(iterable)


@pass_context
def _emit_filter(context, value):
    """Every piece a template writes (to its output, a macro or a ``{% set %}`` block) counts."""
    budget = _budget()
    budget.tick()
    size = len(value) if isinstance(value, str) else _weight(value, budget.max_size)
    budget.emitted += size
    budget.size(budget.emitted, "the text written")
    return value


@pass_context
def _piece_filter(context, value):
    budget = _budget()
    budget.size(len(value) if isinstance(value, str) else _weight(value, budget.max_size), "a concatenated value")
    return value


@pass_context
def _concat_filter(context, value):
    _budget().size(_shallow(value), "a concatenated string")
    return value


_GUARDS = {"hfx_steps": _steps_filter, "hfx_emit": _emit_filter, "hfx_piece": _piece_filter,
           "hfx_concat": _concat_filter}


def _guard(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _GuardTransformer(NodeTransformer):
    """Routes loops, concatenations and written pieces through the budget filters."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = _guard(node.iter, "hfx_steps")
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        node.nodes = [_guard(n, "hfx_piece") for n in node.nodes]
        return _guard(node, "hfx_concat")

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [_guard(n, "hfx_emit") for n in node.nodes]
        return node


_SIZED = (str, list, tuple)
_STR_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """lm-eval's sandboxed environment, with :data:`TEMPLATE_LIMITS` enforced.

    Loops, calls, attribute/item access, the operators ``* ** + %``, every filter and every written
    piece check the budget of the current rendering; no thread or signal is involved.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _parse(self, source, name, filename):
        return _GuardTransformer().visit(super()._parse(source, name, filename))

    def call_binop(self, context, operator, left, right):
        budget = _budget()
        budget.tick()
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "*":
            if ints:
                budget.int_bits(abs(left).bit_length() + abs(right).bit_length(), "a product")
            elif isinstance(left, _SIZED) and isinstance(right, int):
                budget.size(_weight(left, budget.max_size) * max(right, 0), "a repeated value")
            elif isinstance(right, _SIZED) and isinstance(left, int):
                budget.size(_weight(right, budget.max_size) * max(left, 0), "a repeated value")
        elif operator == "**" and ints and abs(left) > 1 and right > 0:
            budget.int_bits(right * abs(left).bit_length(), "a power")
        elif operator == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
            budget.size(_weight(left, budget.max_size) + _weight(right, budget.max_size), "a sum")
        elif operator == "%" and isinstance(left, str):
            _check_ints(budget, right if isinstance(right, tuple) else (right,), {}, "a %-formatted string")
            _check_percent(budget, left, right, "a %-formatted string")
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj, attribute):
        budget = _budget()
        budget.tick()
        value = super().getattr(obj, attribute)
        budget.size(_shallow(value), f"attribute {attribute!r}")
        return value

    def getitem(self, obj, argument):
        budget = _budget()
        budget.tick()
        value = super().getitem(obj, argument)
        budget.size(_shallow(value), "an item")
        return value

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        budget = _budget()
        budget.tick(10 if isinstance(__obj, Macro) else 1)
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        owner = getattr(target, "__self__", None)
        method = getattr(target, "__name__", "")
        what = f"{method or 'a call'}()"
        _check_ints(budget, args, kwargs, what)
        if isinstance(owner, str):
            if method == "format":
                _check_str_format(budget, owner, args, kwargs, what)
            elif method == "format_map" and len(args) == 1 and not kwargs:
                _check_str_format(budget, owner, (), args[0], what)
            elif method == "join" and args:
                args = (_materialise(args[0]), *args[1:])
                budget.size(_estimate_join(budget, owner, args[0]), what)
            elif method == "replace" and len(args) >= 2:
                budget.size(_estimate_replace(owner, str(args[0]), str(args[1]), args[2] if len(args) > 2 else None),
                            what)
            elif method == "expandtabs" and "\t" in owner:
                tab = args[0] if args else kwargs.get("tabsize", 8)
                budget.size(len(owner) * max(int(tab), 1), what)
            elif method == "translate" and args and isinstance(args[0], dict):
                longest = max((_shallow(v) for v in args[0].values()), default=1)
                budget.size(len(owner) * max(longest, 1), what)
        if target is _LIPSUM:
            n = args[0] if args else kwargs.get("n", 5)
            most = args[3] if len(args) > 3 else kwargs.get("max", 100)
            budget.size(int(n) * int(most) * 12, what)
        if type(__obj).__name__ == "LoopContext" and args:  # a recursive loop's next level counts its steps too
            args = (_steps(args[0]), *args[1:])
        result = super().call(__context, __obj, *args, **kwargs)
        budget.size(_shallow(result), f"the result of {what}")
        return result


# Same options as lm-eval's environment (strict undefined, keep the trailing newline) so that
# every template renders to the same string.
_ENV = _BoundedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_LIPSUM = _ENV.globals["lipsum"]
_ENV.filters["regex_replace"] = _regex_replace
_ENV.filters.update({name: _guard_filter(name, func) for name, func in _ENV.filters.items()})
_ENV.filters.update(_GUARDS)


@functools.lru_cache(maxsize=512)
def _compile(template: str):
    return _ENV.from_string(template)


def render(template: str, doc: dict[str, Any], *, where: str = "template") -> str:
    """Render ``template`` with the fields of ``doc`` within :data:`TEMPLATE_LIMITS`.

    Every failure is a :class:`TaskError` naming ``where``: a missing field (with the available
    ones), a syntax error, a forbidden operation, a limit, or an error raised by the template.
    """
    try:
        compiled = _compile(template)
    except TemplateError as exc:
        raise TaskError(f"{where} {template[:200]!r} is not a valid Jinja template: {exc}") from None
    budget = _Budget(where, extra_size=_weight(doc, 2**26))  # a document's own text never counts against it
    token = _BUDGET.set(budget)
    try:
        return compiled.render(**doc)
    except UndefinedError as exc:
        raise TaskError(
            f"{where} {template[:200]!r} references a field that the document does not have ({exc}). "
            f"Available fields: {sorted(doc)}."
        ) from None
    except TaskError:
        raise
    except SecurityError as exc:
        raise TemplateSecurityError(f"{where}: the template sandbox refused it: {exc}") from None
    except RecursionError:
        raise TemplateLimitError(f"{where}: the template recurses too deeply; refused.") from None
    except MemoryError:
        raise TemplateLimitError(f"{where}: the template ran out of memory; refused.") from None
    except Exception as exc:  # an error inside the template (1/0, int('x'), ...): name the field, no traceback
        raise TaskError(f"{where} {template[:200]!r} failed: {type(exc).__name__}: {exc}") from None
    finally:
        _BUDGET.reset(token)


class UnsafeFunction:
    """A ``!function`` reference seen without ``allow_code``: loading it is an error, naming the task file."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path

    def __repr__(self) -> str:
        return f"!function {self.name}"


class MissingPackageError(TaskError):
    """A ``!function`` module needs a package that is not installed (``package`` names it)."""

    def __init__(self, message: str, package: str):
        super().__init__(message)
        self.package = package


def _import_failed(yaml_path: Path, name: str, what: str, exc: BaseException) -> TaskError:
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        package = exc.name.split(".")[0]
        return MissingPackageError(f"{yaml_path}: !function {name}: importing {what} needs the optional package "
                                   f"{package!r}, which is not installed ({exc}).", package)
    return TaskError(f"{yaml_path}: !function {name}: importing {what} failed: {type(exc).__name__}: {exc}")


# Hook files already executed in this process, by path and (size, mtime): lm-eval's catalogue has ~900
# hook modules shared by 7 000 task files; running one module per task file would take minutes.
_MODULES: dict[Path, tuple[tuple[int, int], Any]] = {}


def _load_module_file(module_path: Path, yaml_path: Path, name: str):
    """Execute a task folder's hook file once per version of it; failures (``sys.exit`` included) are a TaskError."""
    stat = module_path.stat()
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _MODULES.get(module_path)
    if cached is not None and cached[0] == key:
        return cached[1]
    spec = importlib.util.spec_from_file_location(f"hfx_task_code.{module_path.stem}", module_path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:  # some hook files exit when a tool they need is missing
        raise TaskError(f"{yaml_path}: !function {name}: importing {module_path} called sys.exit({exc.code!r}) "
                        "(it needs something this machine lacks).") from None
    except Exception as exc:
        raise _import_failed(yaml_path, name, str(module_path), exc) from exc
    _MODULES[module_path] = (key, module)
    return module


def _import_function(name: str, yaml_path: Path, code_root: Path):
    """``module.function`` as lm-eval 0.4.13 resolves it: the file ``module.py`` (dots as folders) next to
    the YAML, which must lie inside ``code_root``; else an installed module (``lm_eval.filters.x``)."""
    module_name, _, function_name = name.rpartition(".")
    if not module_name or not function_name:
        raise TaskError(f"{yaml_path}: !function {name!r} must be written module.function (utils.process_docs).")
    dotted = all(part.isidentifier() for part in module_name.split("."))
    relative = module_name.replace(".", "/") if dotted else module_name  # a path such as sub/helpers or ../x
    module_path = (yaml_path.parent / f"{relative}.py").resolve()
    root = code_root.resolve()
    if dotted and not module_path.is_file():
        return _import_installed(name, module_name, function_name, yaml_path)
    if not module_path.is_relative_to(root):
        raise TaskError(
            f"{yaml_path}: !function {name} resolves to {module_path}, outside the task folder {root}; only Python "
            "files inside the folder the task was found in are imported (pass the folder that holds both the task "
            "and its code as --include-path if you trust it)."
        )
    if not module_path.is_file():
        raise TaskError(f"{yaml_path}: !function {name}: {module_path} does not exist.")
    module = _load_module_file(module_path, yaml_path, name)
    if not callable(getattr(module, function_name, None)):
        raise TaskError(f"{yaml_path}: !function {name}: {module_path} has no function {function_name!r}.")
    return getattr(module, function_name)


def _import_installed(name: str, module_name: str, function_name: str, yaml_path: Path):
    """An installed module's function (lm-eval's bundled hooks name ``lm_eval.tasks.…`` modules)."""
    import importlib

    local = yaml_path.parent / f"{module_name.replace('.', '/')}.py"
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names:  # os.system, subprocess.run, builtins.eval: a YAML string run as code
        raise TaskError(f"{yaml_path}: !function {name}: {local} does not exist, and {top!r} is a standard-library "
                        "module; hooks come from a .py file in the task folder or an installed package (lm_eval).")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        inside = exc.name is not None and (exc.name == module_name or module_name.startswith(exc.name + "."))
        if inside:  # the module itself does not exist (its top-level package may be an optional one)
            message = (f"{yaml_path}: !function {name}: neither {local} nor an installed module {module_name!r} "
                       "exists")
            if exc.name == top and "." in module_name:
                raise MissingPackageError(f"{message} (the package {top!r} is not installed).", top) from None
            raise TaskError(f"{message}.") from None
        raise _import_failed(yaml_path, name, f"module {module_name!r}", exc) from exc  # a package missing
    except SystemExit as exc:
        raise TaskError(f"{yaml_path}: !function {name}: importing module {module_name!r} called "
                        f"sys.exit({exc.code!r}) (it needs something this machine lacks).") from None
    except Exception as exc:
        raise _import_failed(yaml_path, name, f"module {module_name!r}", exc) from exc
    if not callable(getattr(module, function_name, None)):
        raise TaskError(f"{yaml_path}: !function {name}: module {module_name!r} has no function {function_name!r}.")
    return getattr(module, function_name)


# lm-eval 0.4.13's largest task file has under 800 YAML nodes and 63 KB.
MAX_YAML_BYTES = 2**20  # every *.yaml of an --include-path is read: a large one must not stall them all
MAX_YAML_NODES = 20_000  # counted while composing, every alias as the nodes it repeats
MAX_YAML_DEPTH = 64  # nesting of sequences and mappings (lm-eval's files: under 10)


_CSafeLoader = getattr(yaml, "CSafeLoader", None)  # PyYAML built with libyaml (its wheels are)


def _check_events(text: str) -> None:
    """The node, alias-expansion and depth limits of :func:`load_yaml`, checked on libyaml's event stream.

    Events come one at a time, so a hostile file is refused at the event that passes a limit, before
    the rest is read or anything is built; counts are those of the pure-Python loader (a node per
    scalar, sequence or mapping; an alias counts the nodes of its anchor, aliases inside included).
    """
    loader = _CSafeLoader(text)
    nodes, aliased, open_, sizes, composing = 0, False, [], {}, set()

    def count(added: int, event) -> None:
        nonlocal nodes
        nodes += added
        if nodes > MAX_YAML_NODES:
            if aliased:
                raise TaskError(f"expands to more than {MAX_YAML_NODES} YAML nodes (aliases repeat their "
                                "anchor's contents: a 'billion laughs' file); refused before building it")
            raise TaskError(f"has more than {MAX_YAML_NODES} YAML nodes (keys, values, lists and mappings; "
                            f"stopped at line {event.start_mark.line + 1}); refused")

    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                if len(open_) + 1 > MAX_YAML_DEPTH:
                    raise TaskError(f"nested more than {MAX_YAML_DEPTH} levels deep (line "
                                    f"{event.start_mark.line + 1}); refused")
                count(1, event)
                if isinstance(event, yaml.ScalarEvent):
                    if event.anchor is not None:
                        sizes[event.anchor] = 1
                else:
                    open_.append((event.anchor, nodes - 1))
                    if event.anchor is not None:
                        composing.add(event.anchor)
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                anchor, start = open_.pop()
                if anchor is not None:
                    sizes[anchor] = nodes - start
                    composing.discard(anchor)
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor in composing:
                    raise TaskError(f"has an alias that contains itself (line {event.start_mark.line + 1}); refused")
                if event.anchor in sizes:  # an unknown anchor: PyYAML's own error when the file is built
                    aliased = True
                    count(sizes[event.anchor], event)
    except yaml.MarkedYAMLError as exc:  # libyaml's scanner stops at 1000 flow levels, ahead of the events
        if "maximum nesting depth" not in f"{exc.context} {exc.problem}":
            raise
        mark = exc.problem_mark or exc.context_mark
        raise TaskError(f"nested more than {MAX_YAML_DEPTH} levels deep (line {mark.line + 1}); refused") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path, *, allow_code: bool = False, code_root: str | Path | None = None) -> dict[str, Any]:
    """Parse one task YAML with a safe loader, bounded in size and alias expansion.

    ``!function`` is imported only with ``allow_code``, and only from a ``.py`` file inside
    ``code_root`` (default: the YAML's folder). Every problem is a :class:`TaskError` naming the file.
    """
    path = Path(path)
    root = Path(code_root) if code_root is not None else path.parent
    if path.is_dir():
        raise TaskError(f"{path} is a directory, not a task file.")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise TaskError(f"{path}: {size} bytes, more than the {MAX_YAML_BYTES} a task file may have.")
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the task file: {exc.strerror or exc}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TaskError(f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}).") from None

    class Loader(yaml.SafeLoader):
        depth = 0

        def fetch_flow_collection_start(self, token_class):
            # PyYAML's scanner costs O(flow depth) per token inside '[' / '{': '[' * 10**6 would take hours
            if self.flow_level >= MAX_YAML_DEPTH:
                raise TaskError(f"nested more than {MAX_YAML_DEPTH} levels deep (line {self.line + 1}); refused")
            super().fetch_flow_collection_start(token_class)

        def compose_node(self, parent, index):
            # PyYAML composes recursively: a deep '[[[[...' would hit Python's recursion limit (slowly)
            self.depth += 1
            try:
                event = self.peek_event()
                if self.depth > MAX_YAML_DEPTH:
                    raise TaskError(f"nested more than {MAX_YAML_DEPTH} levels deep (line "
                                    f"{event.start_mark.line + 1}); refused")
                if isinstance(event, yaml.AliasEvent):
                    target = self.anchors.get(event.anchor)  # an unknown anchor: PyYAML's own error
                    if target is not None:
                        if id(target) not in self.expanded:  # still being composed
                            raise TaskError(f"has an alias that contains itself (line {event.start_mark.line + 1}); "
                                            "refused")
                        self.aliased += self.expanded[id(target)]
                        self.count(self.expanded[id(target)], event)
                    return super().compose_node(parent, index)
                before = self.nodes
                self.count(1, event)
                node = super().compose_node(parent, index)
                if event.anchor is not None:
                    self.expanded[id(node)] = self.nodes - before
                return node
            finally:
                self.depth -= 1

        def count(self, nodes, event):
            # counted as the document is composed, each alias as the nodes it repeats: a file is refused
            # as soon as it passes the limit, before the rest of it is read
            self.nodes += nodes
            if self.nodes > MAX_YAML_NODES:
                if self.aliased:
                    raise TaskError(f"expands to more than {MAX_YAML_NODES} YAML nodes (aliases repeat their "
                                    "anchor's contents: a 'billion laughs' file); refused before building it")
                raise TaskError(f"has more than {MAX_YAML_NODES} YAML nodes (keys, values, lists and mappings; "
                                f"stopped at line {event.start_mark.line + 1}); refused")

        def get_single_node(self):
            self.nodes, self.aliased, self.expanded = 0, 0, {}  # sizes of anchored nodes, by id
            return super().get_single_node()

    def function(loader, node):
        name = loader.construct_scalar(node)
        return _import_function(name, path, root) if allow_code else UnsafeFunction(name, path)

    Loader.add_constructor("!function", function)
    try:
        if _CSafeLoader is not None:  # libyaml: the same checks on its events, then a C parse (10x faster)
            _check_events(text)

            class CLoader(_CSafeLoader):
                pass

            CLoader.add_constructor("!function", function)
            data = yaml.load(text, Loader=CLoader)  # noqa: S506 - CLoader is a CSafeLoader subclass
        else:
            data = yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass
    except TaskError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise TaskError(f"{path}: {exc}.") from None
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise TaskError(f"{path}: YAML nested too deeply; refused.") from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task file must be a YAML mapping, got {type(data).__name__}.")
    return data


def find_unsafe(value: Any) -> UnsafeFunction | None:
    """The first unresolved ``!function`` inside a config value, if any."""
    if isinstance(value, UnsafeFunction):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = find_unsafe(item)
            if found is not None:
                return found
    return None
