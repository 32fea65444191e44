"""Safe reading of task files: YAML through a safe loader, Jinja through a sandbox.

lm-evaluation-harness task files are data, but two of their features can run code: Jinja
templates (rendered here in :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`, which refuses
attribute tricks such as ``{{ ''.__class__ }}``) and the ``!function module.name`` YAML tag,
which imports a Python file next to the YAML. That tag is resolved only when the caller passes
``allow_code=True`` (``hfx eval --allow-code``); otherwise loading the task fails and says why.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined
from jinja2.exceptions import UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TaskError(ValueError):
    """A task file or its data cannot be used; raised before any model runs."""


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, string, count=count)


# Same options as lm-eval's environment (strict undefined, keep the trailing newline) so that
# every template renders to the same string.
_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_ENV.filters["regex_replace"] = _regex_replace


def render(template: str, doc: dict[str, Any], *, where: str = "template") -> str:
    """Render ``template`` with the fields of ``doc``; a missing field names itself and the available ones."""
    try:
        return _ENV.from_string(template).render(**doc)
    except UndefinedError as exc:
        raise TaskError(
            f"{where} {template!r} references a field that the document does not have ({exc}). "
            f"Available fields: {sorted(doc)}."
        ) from None


class UnsafeFunction:
    """A ``!function`` reference seen without ``allow_code``: loading it is an error, naming the task file."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path

    def __repr__(self) -> str:
        return f"!function {self.name}"


def _import_function(name: str, yaml_path: Path):
    module_name, _, function_name = name.rpartition(".")
    module_path = yaml_path.parent / f"{module_name}.py"
    spec = importlib.util.spec_from_file_location(f"hfx_task_code.{module_name}", module_path)
    if spec is None or not module_path.exists():
        raise TaskError(f"{yaml_path}: !function {name}: {module_path} does not exist.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function_name)


def load_yaml(path: str | Path, *, allow_code: bool = False) -> dict[str, Any]:
    """Parse one task YAML with a safe loader; ``!function`` is imported only with ``allow_code``."""
    path = Path(path)

    class Loader(yaml.SafeLoader):
        pass

    def function(loader, node):
        name = loader.construct_scalar(node)
        return _import_function(name, path) if allow_code else UnsafeFunction(name, path)

    Loader.add_constructor("!function", function)
    with open(path, encoding="utf-8") as handle:
        data = yaml.load(handle, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass
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
