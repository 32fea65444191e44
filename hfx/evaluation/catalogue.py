"""Finding tasks: the index of task names, tags and groups from ``--include-path`` folders and plugins.

Task files are parsed here, never imported (``!function`` code is resolved only when a task is
loaded with ``allow_code``). See :mod:`.tasks` for one task's rendering and :mod:`.groups` for the
tree :meth:`TaskIndex.resolve` builds.

Names follow lm-eval 0.4.13's index: every ``*.yaml`` under a folder is read with its ``include:``
files merged (so tags inherited from an included file count); a file with ``class:`` is a Python
task, one with ``group:`` a group, one with ``task:`` a task. Within one folder the first file (in
path order) that declares a name wins; a later folder wins over an earlier one. Reading lm-eval's
13k files takes seconds, so each folder's index is cached (:data:`INDEX_CACHE_VERSION`) keyed by the
size, mtime and ctime of every file and of the files it includes.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..registry import registry
from .groups import AggregateMetric, GroupNode, TaskRef
from .tasks import Task, TaskConfig
from .templates import TaskError, UnsafeFunction, load_yaml

# -- include: ---------------------------------------------------------------------------------
MAX_INCLUDE_DEPTH = 32  # lm-eval 0.4.13's own task files include at most a few levels deep
MAX_INCLUDE_FILES = 256  # files one task's include tree may read (lists of includes multiply)
_IGNORE_DIRS = frozenset({"__pycache__", ".ipynb_checkpoints"})


def _merge_include(data: dict, path: Path, allow_code: bool, code_root: Path | None = None, *,
                   load=None, deps: dict | None = None) -> dict:
    """``data`` (the YAML at ``path``) merged over the files it includes, as lm-eval merges them.

    ``include:`` is one file or a list; each included file is merged (recursively) in list order,
    a later one over an earlier one, and the including file's own keys win. An included file's
    ``task_list`` is dropped. Bounded in depth and files, cycle-checked (lm-eval reads a file at
    most once per tree, so a file included twice is refused too). ``deps`` collects every file read.
    """
    load = load or (lambda p: load_yaml(p, allow_code=allow_code, code_root=code_root))
    seen: set[Path] = {path.resolve()}

    def merge(current: dict, current_path: Path, chain: list[Path]) -> dict:
        if "include" not in current:
            return current
        include = current["include"]
        items = include if isinstance(include, list) else [include]
        merged: dict = {}
        for item in items:
            if not isinstance(item, str) or not item:
                raise TaskError(f"{current_path}: include must name YAML files (a path or a list of paths), "
                                f"got {include!r}.")
            base_path = (current_path.parent / item).resolve()
            if base_path in chain:
                cycle = " -> ".join(str(p) for p in chain[chain.index(base_path):] + [base_path])
                raise TaskError(f"{path}: include cycle: {cycle}.")
            if base_path in seen:
                raise TaskError(f"{path}: includes {base_path} twice (lm-eval reads a file once per include tree).")
            if len(chain) > MAX_INCLUDE_DEPTH:
                raise TaskError(f"{path}: include chain longer than {MAX_INCLUDE_DEPTH} files "
                                f"(stopped at {current_path}).")
            if len(seen) >= MAX_INCLUDE_FILES:
                raise TaskError(f"{path}: includes more than {MAX_INCLUDE_FILES} files; refused.")
            if deps is not None:
                deps[str(base_path)] = _stat(base_path)
            if not base_path.exists():
                raise TaskError(f"{current_path}: include {item!r} not found ({base_path}).")
            if base_path.is_dir():
                raise TaskError(f"{current_path}: include {item!r} is a directory ({base_path}); it must name one "
                                "YAML file.")
            seen.add(base_path)
            included = dict(merge(load(base_path), base_path, chain + [base_path]))
            included.pop("task_list", None)  # it lists tasks of the included file only
            merged.update(included)
        merged.update({k: v for k, v in current.items() if k != "include"})
        return merged

    return merge(data, path, [path.resolve()])


_TASK_LINE = re.compile(r"^task:[ \t]*[\"']?([^\s\"'#]+)", re.MULTILINE)
_NAME_LINE = re.compile(r"^(task|group):[ \t]*[\"']?([^\s\"'#\[\]{}]+)", re.MULTILINE)


def _head(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(1 << 16).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _declared_task_name(path: Path) -> str | None:
    """The ``task:`` name written in a file that does not parse, read as text (for the error message)."""
    match = _TASK_LINE.search(_head(path))
    return match.group(1) if match else None


def _stat_str(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _stat(path: Path) -> list[int] | None:
    return _stat_str(str(path))


def _str_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(v for v in value if isinstance(v, str))
    return ()


@dataclass
class TaskSource:
    """One name of the index: a task (``class_name`` set for a Python ``class:`` task), a group or a tag.

    A task or group comes from a YAML file (``path``) or an in-memory mapping (``data``, from a
    plugin); a tag's ``members`` are the tasks that declare it. ``error``: the file parses but its
    includes do not (loading the name raises it).
    """

    name: str
    path: Path | None = None
    data: dict | None = None
    origin: str = ""
    tags: tuple[str, ...] = ()
    root: Path | None = None  # the folder ``!function`` code may come from
    kind: str = "task"  # "task" | "group" | "tag"
    output_type: str | None = None
    class_name: str | None = None
    members: set[str] = field(default_factory=set)
    error: str | None = None


# -- the per-folder index cache -----------------------------------------------------------------
INDEX_CACHE_VERSION = 1


def _cache_version() -> str:
    """The format, and the limits that decide whether a file is readable: a change rebuilds the cache."""
    from . import templates

    return (f"{INDEX_CACHE_VERSION}:{templates.MAX_YAML_BYTES}:{templates.MAX_YAML_NODES}:{templates.MAX_YAML_DEPTH}"
            f":{MAX_INCLUDE_DEPTH}:{MAX_INCLUDE_FILES}")


def _cache_file(root: Path) -> Path:
    from .cache import default_cache_dir

    key = hashlib.blake2b(str(root.resolve()).encode(), digest_size=12).hexdigest()
    return default_cache_dir() / "task-index" / f"{key}.json"


def _scan_file(file: Path, root: Path, parsed: dict[Path, dict]) -> dict:
    """The index record of one YAML file: kind, name, tags, output type, class; and the files it read."""
    def load(p: Path) -> dict:
        p = p.resolve()
        if p not in parsed:
            parsed[p] = load_yaml(p, allow_code=False, code_root=root)
        return parsed[p]

    record: dict[str, Any] = {"stat": _stat(file), "deps": {}}
    try:
        data = load(file)
    except TaskError as exc:
        record.update(broken=str(exc), declared=_declared_task_name(file))
        return record
    try:
        merged = _merge_include(data, file, False, root, load=load, deps=record["deps"])
    except TaskError as exc:
        merged, record["error"] = data, str(exc)
    if "class" in merged:
        kind = "task"
        cls = merged["class"]
        record["class"] = cls.name if isinstance(cls, UnsafeFunction) else str(cls)
    elif "group" in merged:
        kind = "group"
    elif "task" in merged:
        kind = "task"
    else:
        return record  # an include fragment, or another YAML file: not a name
    name = merged.get("group") if kind == "group" else merged.get("task")
    if not isinstance(name, str):
        return record  # lm-eval cannot index it either
    output_type = merged.get("output_type")
    record.update(kind=kind, name=name, tags=list(_str_list(merged.get("tag"))),
                  output_type=output_type if isinstance(output_type, str) else None)
    return record


def _yaml_files(root: Path) -> list[tuple[str, str]]:
    """``(relative posix path, path)`` of every ``*.yaml`` file under ``root``, sorted as lm-eval sorts them."""
    out, prefix = [], len(str(root)) + 1
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _IGNORE_DIRS]
        for name in files:
            if name.endswith(".yaml"):
                full = os.path.join(folder, name)
                out.append((full[prefix:].replace(os.sep, "/"), full))
    out.sort()
    return out


def _fresh(record: Any, stat: list[int] | None, dep_ok: list[bool]) -> bool:
    if not isinstance(record, dict) or record.get("stat") != stat or not isinstance(record.get("deps"), list):
        return False
    try:
        return all(dep_ok[i] for i in record["deps"])
    except (IndexError, TypeError):
        return False


_CHANGED = [-1]  # the stat of a dependency seen changing during a scan: matches no real file's stat


def scan_folder(root: Path, *, cache: bool = True) -> dict[str, dict]:
    """``{relative posix path: record}`` for every ``*.yaml`` under ``root`` in lm-eval's order, cached.

    The cache holds one record per file and one table of the files they include (``deps``); a
    record is reused only while its file and every file it includes have the size, mtime and ctime
    recorded. A cache that cannot be read is rebuilt.
    """
    files = _yaml_files(root)
    cached: dict = {}
    dep_paths: list[str] = []
    dep_stats: list = []
    dep_ok: list[bool] = []
    cache_path = _cache_file(root) if cache else None
    if cache_path is not None and cache_path.is_file():
        try:
            loaded = json.loads(cache_path.read_text(encoding="utf-8"))
            if loaded.get("version") == _cache_version() and isinstance(loaded.get("files"), dict):
                cached = loaded["files"]
                dep_paths = [str(p) for p, _ in loaded["deps"]]
                dep_stats = [s for _, s in loaded["deps"]]
                dep_ok = [_stat_str(p) == s for p, s in loaded["deps"]]
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError, KeyError):
            cached, dep_paths, dep_stats, dep_ok = {}, [], [], []  # a corrupt cache is rebuilt, never trusted
    out: dict[str, dict] = {}
    parsed: dict[Path, dict] = {}
    changed = len(cached) != len(files)
    new_deps: dict[str, int] = {}
    dep_table: list[list] = []

    def dep_id(path: str, stat: Any) -> int:
        """A dependency with the stat it had when it was read (or checked): never a later one, so a file
        changed during the scan is read again next time. Two different stats of one file: never fresh."""
        if path not in new_deps:
            new_deps[path] = len(dep_table)
            dep_table.append([path, stat])
        elif dep_table[new_deps[path]][1] != stat:
            dep_table[new_deps[path]][1] = _CHANGED
        return new_deps[path]

    for rel, full in files:
        record = cached.get(rel)
        if _fresh(record, _stat_str(full), dep_ok):
            record = dict(record, deps=[dep_id(dep_paths[i], dep_stats[i]) for i in record["deps"]])
        else:
            record, changed = _scan_file(Path(full), root, parsed), True
            record["deps"] = [dep_id(p, s) for p, s in record["deps"].items()]
        out[rel] = record
    if cache_path is not None and changed:
        from .results import write_atomic

        try:
            write_atomic(cache_path, json.dumps({"version": _cache_version(), "root": str(root.resolve()),
                                                 "deps": dep_table, "files": out}, separators=(",", ":")))
        except OSError:
            pass  # the cache only saves time
    return out


# -- lm-eval's own catalogue, for the "not included" hint --------------------------------------
def _lm_eval_tasks_dir() -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "tasks"
    return folder if folder.is_dir() else None


def lm_eval_catalogue_kind(name: str) -> tuple[str, Path] | None:
    """``(kind, tasks folder)`` when lm-eval's bundled catalogue has ``name``: from its cached index if
    one exists, else from the ``task:`` / ``group:`` lines of its files (no YAML parsed)."""
    folder = _lm_eval_tasks_dir()
    if folder is None:
        return None
    try:
        files = json.loads(_cache_file(folder).read_text(encoding="utf-8"))["files"]
        for record in files.values():
            if record.get("name") == name:
                return record.get("kind", "task"), folder
            if name in (record.get("tags") or ()):
                return "tag", folder
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    for file in folder.rglob("*.yaml"):
        for kind, found in _NAME_LINE.findall(_head(file)):
            if found == name:
                return kind, folder
    return None


# -- groups -----------------------------------------------------------------------------------
GROUP_FIELDS = frozenset({"group", "group_alias", "task", "aggregate_metric_list", "metadata"})
AGGREGATE_KEYS = ("metric", "filter_list", "aggregation", "weight_by_size")
STRUCTURAL_KEYS = ("tag", "group", "task_list")
# keys that make a member mapping an inline task definition rather than a reference with a typo
_DEFINING_KEYS = ("dataset_path", "custom_dataset", "class", "include", "output_type", "doc_to_text",
                  "doc_to_target", "doc_to_choice")  # not part of a task's config (lm-eval drops them)


def _aggregate_metrics(group: str, value: Any) -> list[AggregateMetric] | None:
    """``aggregate_metric_list`` normalised as lm-eval's GroupConfig does: one mapping or a list of them."""
    if value is None:
        return None
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise TaskError(f"Group {group!r}: aggregate_metric_list must be a mapping or a list of mappings, "
                        f"got {value!r}.")
    out = []
    for item in items:
        if not isinstance(item, dict):
            raise TaskError(f"Group {group!r}: aggregate_metric_list entries must be mappings with keys "
                            f"{list(AGGREGATE_KEYS)}, got {item!r}.")
        unknown = sorted(set(item) - set(AGGREGATE_KEYS))
        if unknown or "metric" not in item:
            raise TaskError(f"Group {group!r}: aggregate_metric_list entry {item!r} "
                            f"{'has unknown keys ' + str(unknown) if unknown else 'has no metric'}; valid keys: "
                            f"{list(AGGREGATE_KEYS)}.")
        aggregation = item.get("aggregation", "mean")
        if isinstance(aggregation, UnsafeFunction):
            raise TaskError(f"Group {group!r}: aggregation {aggregation!r} is Python code; pass --allow-code to run "
                            "it.")
        if aggregation != "mean" and not callable(aggregation):
            raise TaskError(f"Group {group!r}: aggregation {aggregation!r} for {item['metric']!r} is not supported; "
                            "lm-eval 0.4.13 accepts 'mean' or a !function.")
        filters = item.get("filter_list")
        if isinstance(filters, str):
            filters = (filters,)
        elif filters is not None:
            filters = tuple(filters)
        out.append(AggregateMetric(metric=item["metric"], aggregation=aggregation,
                                   weight_by_size=item.get("weight_by_size", True), filter_list=filters))
    return out


def _task_overrides(values: dict) -> dict | None:
    """What a group passes down to a member task: everything but the structural keys."""
    out = {k: v for k, v in values.items() if k not in ("task", *STRUCTURAL_KEYS)}
    return out or None


class TaskIndex:
    """Task, tag and group names from include paths and ``hfx.tasks`` plugins; files are parsed, never imported."""

    def __init__(self, include_paths: Iterable[str | Path] = (), *, allow_code: bool = False, plugins: bool = True,
                 cache: bool = True):
        self.allow_code = allow_code
        self.cache = cache
        self.entries: dict[str, TaskSource] = {}
        self.include_paths: list[Path] = []
        # task files that could not be read: reported, and fatal only for a task named in them
        self.broken: dict[Path, TaskError] = {}
        self.broken_names: dict[str, tuple[Path, TaskError]] = {}
        self.duplicates: list[tuple[str, Path, Path]] = []  # (name, file kept, file skipped)
        # parsed YAML by (file, code root), for this index's lifetime: lm-eval's shared include files are
        # read by hundreds of tasks each; handed out as deep copies, so no task sees another's edits
        self._parsed: dict[tuple[Path, Path], dict | TaskError] = {}
        for path in include_paths:
            self._add_path(Path(path), origin=f"--include-path {path}")
        if plugins:
            for plugin in registry.names("tasks"):
                self._add_plugin(plugin)

    # -- building -----------------------------------------------------------------------------
    @property
    def sources(self) -> dict[str, TaskSource]:
        """The tasks (not groups or tags), by name."""
        return {n: e for n, e in self.entries.items() if e.kind == "task"}

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
            if isinstance(item, dict) and isinstance(item.get("group"), str):
                self.entries.setdefault(item["group"], TaskSource(item["group"], data=item, origin=origin,
                                                                  kind="group"))
            elif isinstance(item, dict):
                self._add_plugin_task(TaskSource(item.get("task"), data=item, origin=origin), item)
            elif isinstance(item, (str, Path)):
                self._add_path(Path(item), origin=origin, override=False)
            else:
                warnings.warn(f"hfx.tasks plugin {plugin!r}: ignoring {item!r} (expected a task mapping or a YAML path)",
                              stacklevel=3)

    def _add_plugin_task(self, source: TaskSource, data: dict) -> None:
        # include paths come first and win over plugins of the same name
        source.tags = _str_list(data.get("tag"))
        source.output_type = data.get("output_type")
        if source.name in self.entries:
            return
        self.entries[source.name] = source
        for tag in source.tags:
            entry = self.entries.setdefault(tag, TaskSource(tag, kind="tag", origin=source.origin))
            if entry.kind == "tag":
                entry.members.add(source.name)

    def _add_path(self, path: Path, origin: str, override: bool = True) -> None:
        if not path.exists():
            raise TaskError(f"Task path {path} ({origin}) does not exist.")
        root = path if path.is_dir() else path.parent
        if path.is_dir():
            records = scan_folder(path, cache=self.cache)
            self.include_paths.append(path)
        else:
            records = {path.name: _scan_file(path, root, {})}
        local: dict[str, TaskSource] = {}
        for rel, record in records.items():
            file = root / rel
            if "broken" in record:  # one broken file never hides the other tasks of the folder
                exc = TaskError(record["broken"])
                self.broken[file] = exc
                if record.get("declared") is not None:
                    self.broken_names.setdefault(record["declared"], (file, exc))
                warnings.warn(f"Skipping task file {file} ({origin}): {exc}", stacklevel=3)
                continue
            kind, name = record.get("kind"), record.get("name")
            if kind is None or not isinstance(name, str):
                continue
            if name in local:  # lm-eval: within one folder the first file wins
                if local[name].path is not None:
                    self.duplicates.append((name, local[name].path, file))
                continue
            local[name] = TaskSource(name, path=file, origin=origin, tags=tuple(record.get("tags") or ()), root=root,
                                     kind=kind, output_type=record.get("output_type"),
                                     class_name=record.get("class"), error=record.get("error"))
            if kind == "task":
                for tag in local[name].tags:
                    entry = local.setdefault(tag, TaskSource(tag, kind="tag", origin=origin))
                    if entry.kind == "tag":
                        entry.members.add(name)
        for name, entry in local.items():  # lm-eval: a later folder wins over an earlier one
            if override or name not in self.entries:
                self.entries[name] = entry

    # -- reading ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Task names (not groups or tags), sorted."""
        return sorted(n for n, e in self.entries.items() if e.kind == "task")

    def kind(self, name: str) -> str | None:
        """``"task"``, ``"group"``, ``"tag"``, or None for a name the index does not have."""
        entry = self.entries.get(name)
        return entry.kind if entry is not None else None

    def listing(self) -> list[TaskSource]:
        """Every entry (tasks, groups, tags), sorted by name: kind, output_type, path, class_name, error."""
        return [self.entries[n] for n in sorted(self.entries)]

    def tags(self) -> dict[str, list[str]]:
        return {n: sorted(e.members) for n, e in self.entries.items() if e.kind == "tag"}

    def groups(self) -> list[str]:
        return sorted(n for n, e in self.entries.items() if e.kind == "group")

    def _unknown(self, name: str) -> TaskError:
        if name in self.broken_names:
            file, exc = self.broken_names[name]
            return TaskError(f"Task {name!r} cannot be loaded: {exc}")
        known = sorted(self.entries)
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        bundled = ""
        found = lm_eval_catalogue_kind(name)
        if found is not None:
            kind, folder = found
            included = any(p.resolve() == folder.resolve() for p in self.include_paths)
            if not included:
                bundled = (f" {name} is a {kind} in lm-eval's bundled catalogue, which was not included: pass "
                           f"--include-path {folder}.")
        broken = (f" {len(self.broken)} task file(s) could not be read: "
                  f"{', '.join(str(f) for f in list(self.broken)[:5])}." if self.broken else "")
        return TaskError(
            f"Unknown task {name!r}.{bundled}{hint} {len(known)} tasks/groups/tags are known from --include-path "
            f"and hfx.tasks plugins{': ' + ', '.join(known[:30]) if known else ''}.{broken}"
        )

    def _raw(self, entry: TaskSource) -> dict:
        """The merged YAML of a task or group entry (code imported only with ``allow_code``)."""
        if entry.data is not None:
            return dict(entry.data)
        if entry.error is not None:
            raise TaskError(entry.error)
        root = entry.root or entry.path.parent
        return _merge_include(self._load(entry.path, root), entry.path, self.allow_code, root,
                              load=lambda path: self._load(path, root))

    def _load(self, path: Path, root: Path) -> dict:
        key = (path.resolve(), root)
        if key not in self._parsed:
            try:
                self._parsed[key] = load_yaml(path, allow_code=self.allow_code, code_root=root)
            except TaskError as exc:  # e.g. a hook needing a missing package: every includer fails alike
                self._parsed[key] = exc
        parsed = self._parsed[key]
        if isinstance(parsed, TaskError):
            raise parsed
        return copy.deepcopy(parsed)

    def resolve(self, names: Iterable[str]) -> list[GroupNode | TaskRef]:
        """Requested names as lm-eval builds them: a group a :class:`GroupNode` tree, a tag its tasks
        (sorted), a task a :class:`TaskRef`. Unknown names, unknown members and group cycles raise."""
        out: list[GroupNode | TaskRef] = []
        for name in names:
            entry = self.entries.get(name)
            if entry is None:
                raise self._unknown(name)
            if entry.kind == "tag":
                out.extend(TaskRef(m) for m in sorted(entry.members) if self.kind(m) == "task")
            elif entry.kind == "group":
                out.append(self._group(name, self._raw(entry), None, (), entry, entry.path))
            else:
                out.append(TaskRef(name))
        seen: dict[str, str] = {}  # lm-eval refuses a task requested through two top-level items
        for item in out:
            source = item.name
            for ref in item.task_refs() if isinstance(item, GroupNode) else [item]:
                if seen.get(ref.name, source) != source:
                    raise TaskError(f"Task {ref.name!r} is requested twice: in {seen[ref.name]!r} and in {source!r}.")
                seen[ref.name] = source
        return out

    def _group(self, name: str, raw: dict, overrides: dict | None, stack: tuple[str, ...],
               entry: TaskSource | None, where: Path | None) -> GroupNode:
        if name in stack:
            raise TaskError(f"Group cycle: {' -> '.join(stack[stack.index(name):] + (name,))}.")
        stack = stack + (name,)
        metadata = raw.get("metadata")
        node = GroupNode(name, alias=raw.get("group_alias"),
                         aggregate_metric_list=_aggregate_metrics(name, raw.get("aggregate_metric_list")),
                         metadata=metadata if isinstance(metadata, dict) or metadata is None else {"_metadata": metadata},
                         source=str(entry.path) if entry is not None and entry.path else "inline")
        # a group's other keys are defaults for its members; the caller's overrides win
        passed = {**{k: v for k, v in raw.items() if k not in GROUP_FIELDS}, **(overrides or {})}
        members = raw.get("task")
        if not isinstance(members, list):
            return node  # lm-eval builds no members from a single name
        children: dict[str, GroupNode | TaskRef] = {}  # lm-eval keys a group's children by name
        for item in members:
            for child in self._members(name, item, passed, stack, where):
                children[child.name] = child
        node.children = list(children.values())
        return node

    def _members(self, group: str, item: Any, passed: dict, stack: tuple[str, ...],
                 where: Path | None) -> list[GroupNode | TaskRef]:
        if isinstance(item, dict) and "group" in item:
            inner = item["group"]
            if not isinstance(inner, str):
                raise TaskError(f"Group {group!r}: member group name must be a string, got {inner!r}.")
            if inner not in self.entries:  # an inline group, named under its parent
                return [self._group(f"{group}::{inner}", item, passed, stack, None, where)]
            base, item_overrides = inner, {**passed, **{k: v for k, v in item.items() if k not in GROUP_FIELDS}}
        elif isinstance(item, dict):
            if "task" not in item:
                raise TaskError(f"Group {group!r}: a member mapping must have a 'task' or 'group' key, got keys "
                                f"{sorted(item)}.")
            base, item_overrides = item["task"], {**passed, **item}
            if not isinstance(base, str):
                raise TaskError(f"Group {group!r}: member task name must be a string, got {base!r}.")
            if base not in self.entries:  # an inline task definition
                if "include" in item and where is not None:
                    # lm-eval 0.4.13 leaves an inline include unread (the task then has no dataset); hfx
                    # reads it relative to the group's file, as earlier lm-eval versions did
                    root = self._root_of(where)
                    item = _merge_include(item, where, self.allow_code, root)
                    item_overrides = {**passed, **item}
                if not any(k in item for k in _DEFINING_KEYS):
                    raise self._member_error(group, base)
                namespaced = f"{group}::{base}"
                config = {k: v for k, v in item_overrides.items() if k not in STRUCTURAL_KEYS}
                return [TaskRef(namespaced, {**config, "task": namespaced})]
        elif isinstance(item, str):
            base, item_overrides = item, passed
        else:
            raise TaskError(f"Group {group!r}: unsupported member {item!r} (a name or a mapping with 'task' or "
                            "'group').")
        entry = self.entries.get(base)
        if entry is None:
            raise self._member_error(group, base)
        if entry.kind == "group":
            # lm-eval would also pass ``task: <name>`` down, renaming every member: not reproduced
            return [self._group(base, self._raw(entry), _task_overrides(item_overrides), stack, entry, entry.path)]
        if entry.kind == "tag":
            return [TaskRef(m, _task_overrides(item_overrides)) for m in sorted(entry.members)
                    if self.kind(m) == "task"]
        return [TaskRef(base, _task_overrides(item_overrides))]

    def _root_of(self, path: Path) -> Path:
        """The include folder a file was found in (``!function`` code may come from inside it)."""
        for folder in self.include_paths:
            if path.is_relative_to(folder):
                return folder
        return path.parent

    def _member_error(self, group: str, member: str) -> TaskError:
        close = difflib.get_close_matches(member, sorted(self.entries), n=5, cutoff=0.6)
        return TaskError(f"Group {group!r}: member {member!r} is not a known task, group or tag"
                         f"{f' (did you mean {close}?)' if close else ''}.")

    def expand(self, names: Iterable[str]) -> list[str]:
        """Task names for a list of task, tag or group names (a group: its leaves); unknown names fail
        with the closest known ones."""
        out = []
        for item in self.resolve(names):
            out.extend(r.name for r in (item.task_refs() if isinstance(item, GroupNode) else [item]))
        return list(dict.fromkeys(out))

    def config(self, ref: str | TaskRef) -> TaskConfig:
        """A task's merged config; for a :class:`TaskRef`, with the overrides its group wrote merged over it
        (an inline definition: the overrides alone)."""
        name, overrides = (ref.name, ref.overrides) if isinstance(ref, TaskRef) else (ref, None)
        source = self.entries.get(name)
        if source is None or source.kind != "task":
            if overrides is None:
                raise self._unknown(name)
            return TaskConfig.from_dict(dict(overrides), source="inline")  # an inline task of a group
        data = self._raw(source)
        data = {k: v for k, v in {**data, **(overrides or {})}.items() if k not in ("group", "task_list")}
        return TaskConfig.from_dict(data, source=source.origin if source.data is not None else str(source.path))

    def load(self, ref: str | TaskRef) -> Task:
        return Task(self.config(ref))


def find_tasks(
    names: Iterable[str] | str, include_paths: Iterable[str | Path] = (), *, allow_code: bool = False
) -> list[Task]:
    """Tasks by name (comma-separated string or list): tasks, tags and the leaves of groups, from include
    paths and ``hfx.tasks`` plugins."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    index = TaskIndex(include_paths, allow_code=allow_code)
    refs: dict[str, TaskRef] = {}
    for item in index.resolve(names):
        for ref in item.task_refs() if isinstance(item, GroupNode) else [item]:
            refs.setdefault(ref.name, ref)
    return [index.load(ref) for ref in refs.values()]
