"""Finding tasks: the index of task names, tags and groups from ``--include-path`` folders and plugins.

Task files are parsed here, never imported (``!function`` code is resolved only when a task is
loaded with ``allow_code``). See :mod:`.tasks` for one task's rendering.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..registry import registry
from .tasks import Task, TaskConfig
from .templates import TaskError, load_yaml

# -- finding tasks ----------------------------------------------------------------------------
MAX_INCLUDE_DEPTH = 32  # lm-eval 0.4.13's own task files include at most a few levels deep


def _merge_include(data: dict, path: Path, allow_code: bool, code_root: Path | None = None) -> dict:
    """``data`` (the YAML at ``path``) merged over the files it includes, nearest last; bounded and cycle-checked."""
    layers, chain, current, current_path = [data], [path.resolve()], data, path
    while current.get("include"):
        include = current["include"]
        if not isinstance(include, str):
            raise TaskError(f"{current_path}: include must name one YAML file, got {include!r}.")
        base_path = (current_path.parent / include).resolve()
        if base_path in chain:
            cycle = " -> ".join(str(p) for p in chain[chain.index(base_path):] + [base_path])
            raise TaskError(f"{path}: include cycle: {cycle}.")
        if len(chain) > MAX_INCLUDE_DEPTH:
            raise TaskError(f"{path}: include chain longer than {MAX_INCLUDE_DEPTH} files (stopped at {current_path}).")
        if not base_path.exists():
            raise TaskError(f"{current_path}: include {include!r} not found ({base_path}).")
        if base_path.is_dir():
            raise TaskError(f"{current_path}: include {include!r} is a directory ({base_path}); it must name one "
                            "YAML file.")
        current = load_yaml(base_path, allow_code=allow_code, code_root=code_root)
        layers.append(current)
        chain.append(base_path)
        current_path = base_path
    merged: dict = {}
    for layer in reversed(layers):
        merged.update({k: v for k, v in layer.items() if k != "include"})
    return merged


_TASK_LINE = re.compile(r"^task:[ \t]*[\"']?([^\s\"'#]+)", re.MULTILINE)


def _declared_task_name(path: Path) -> str | None:
    """The ``task:`` name written in a file that does not parse, read as text (for the error message)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1 << 16).decode("utf-8", errors="replace")
    except OSError:
        return None
    match = _TASK_LINE.search(head)
    return match.group(1) if match else None


@dataclass
class TaskSource:
    """Where one task name comes from: a YAML file or an in-memory mapping (from a plugin)."""

    name: str
    path: Path | None = None
    data: dict | None = None
    origin: str = ""
    tags: tuple[str, ...] = ()
    root: Path | None = None  # the folder ``!function`` code may come from


class TaskIndex:
    """Task names from include paths and ``hfx.tasks`` plugins; files are parsed, never imported."""

    def __init__(self, include_paths: Iterable[str | Path] = (), *, allow_code: bool = False, plugins: bool = True):
        self.allow_code = allow_code
        self.sources: dict[str, TaskSource] = {}
        # task files that could not be read: reported, and fatal only for a task named in them
        self.broken: dict[Path, TaskError] = {}
        self.broken_names: dict[str, tuple[Path, TaskError]] = {}
        for path in include_paths:
            self._add_path(Path(path), origin=f"--include-path {path}")
        if plugins:
            for plugin in registry.names("tasks"):
                self._add_plugin(plugin)

    def _add_plugin(self, plugin: str) -> None:
        try:
            items = list(registry.get("tasks", plugin).factory())
        except Exception as exc:  # a broken plugin names itself and never hides the other tasks
            warnings.warn(f"hfx.tasks plugin {plugin!r} skipped: {type(exc).__name__}: {exc}", stacklevel=3)
            return
        for item in items:
            origin = f"plugin {plugin}"
            if isinstance(item, TaskConfig):
                fields = dataclasses.asdict(item)
                item = {**{k: v for k, v in fields.items() if k not in ("extra", "source")}, **item.extra}
            if isinstance(item, dict):
                self._add_source(TaskSource(item.get("task"), data=item, origin=origin), item)
            elif isinstance(item, (str, Path)):
                self._add_path(Path(item), origin=origin)
            else:
                warnings.warn(f"hfx.tasks plugin {plugin!r}: ignoring {item!r} (expected a task mapping or a YAML path)",
                              stacklevel=3)

    def _add_path(self, path: Path, origin: str) -> None:
        if not path.exists():
            raise TaskError(f"Task path {path} ({origin}) does not exist.")
        root = path if path.is_dir() else path.parent
        files = sorted(f for f in path.rglob("*.yaml") if f.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                data = load_yaml(file, allow_code=False)  # peek only: names and tags, no code
            except TaskError as exc:  # one broken file never hides the other tasks of the folder
                self.broken[file] = exc
                name = _declared_task_name(file)
                if name is not None:
                    self.broken_names.setdefault(name, (file, exc))
                warnings.warn(f"Skipping task file {file} ({origin}): {exc}", stacklevel=3)
                continue
            if isinstance(data.get("task"), str):
                self._add_source(TaskSource(data["task"], path=file, origin=origin, root=root), data)

    def _add_source(self, source: TaskSource, data: dict) -> None:
        tags = data.get("tag") or ()
        source.tags = (tags,) if isinstance(tags, str) else tuple(tags)
        # include paths come first and win over plugins of the same name
        self.sources.setdefault(source.name, source)

    def names(self) -> list[str]:
        return sorted(self.sources)

    def tags(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, source in self.sources.items():
            for tag in source.tags:
                out.setdefault(tag, []).append(name)
        return out

    def expand(self, names: Iterable[str]) -> list[str]:
        """Task names for a list of task or tag names; unknown names fail with the closest known ones."""
        out, tags = [], self.tags()
        for name in names:
            if name in self.sources:
                out.append(name)
            elif name in tags:
                out.extend(sorted(tags[name]))
            elif name in self.broken_names:
                file, exc = self.broken_names[name]
                raise TaskError(f"Task {name!r} cannot be loaded: {exc}")
            else:
                known = self.names() + sorted(tags)
                close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
                hint = f" Did you mean {close}?" if close else ""
                broken = (f" {len(self.broken)} task file(s) could not be read: "
                          f"{', '.join(str(f) for f in list(self.broken)[:5])}." if self.broken else "")
                raise TaskError(
                    f"Unknown task {name!r}.{hint} {len(known)} tasks/tags are known from --include-path and "
                    f"hfx.tasks plugins{': ' + ', '.join(known[:30]) if known else ''}.{broken}"
                )
        return list(dict.fromkeys(out))

    def config(self, name: str) -> TaskConfig:
        source = self.sources[name]
        if source.data is not None:
            return TaskConfig.from_dict(source.data, source=source.origin)
        root = source.root or source.path.parent
        data = _merge_include(load_yaml(source.path, allow_code=self.allow_code, code_root=root), source.path,
                              self.allow_code, root)
        return TaskConfig.from_dict(data, source=str(source.path))

    def load(self, name: str) -> Task:
        return Task(self.config(name))


def find_tasks(
    names: Iterable[str] | str, include_paths: Iterable[str | Path] = (), *, allow_code: bool = False
) -> list[Task]:
    """Tasks by name (comma-separated string or list), from include paths and ``hfx.tasks`` plugins."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    index = TaskIndex(include_paths, allow_code=allow_code)
    return [index.load(name) for name in index.expand(names)]
