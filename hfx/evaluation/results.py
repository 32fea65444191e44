"""Results in lm-eval's JSON shape, a markdown table, per-document sample logs, atomic writes.

``build_results`` returns a dict readers of lm-eval output already understand::

    {"results":  {task: {"name": task, "alias": task, "sample_len": n, "acc,none": 0.5, "acc_stderr,none": 0.1},
                  group: {"alias": ..., "name": group, "sample_len": N, "acc,none": ..., "sample_count": {...}}},
                           # "<metric>,<filter>": "none" unless the task has a filter_list
     "groups": {group: <its results entry>},   # groups with an aggregate_metric_list only
     "group_subtasks": {group: [direct children]},
     "configs":  {task: <task config>},
     "versions": {task: <metadata.version or "Yaml">},
     "n-shot":   {task: k},
     "higher_is_better": {task: {metric: bool}},
     "n-samples": {task: {"original": N, "effective": n}},
     "config":   {"model": ..., "batch_size": ..., "limit": ..., "random_seed": 0, "numpy_seed": 1234,
                  "torch_seed": S, "fewshot_seed": S, "model_identity": <cache key>},
     "date": <unix time>, "total_evaluation_time_seconds": "<s>",
     "skipped": {task or group: reason}}   # only with skip_unsupported, when something was skipped

Groups aggregate as lm-eval 0.4.13 does (``Group.aggregate``): over their *leaf* tasks (nested
groups do not feed their parent's numbers; a task under two subgroups counts twice), sizes being
each leaf's ``sample_len``; the stderr pooled (``weight_by_size``) or of the unweighted mean.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..safe_paths import blocking_parent
from .groups import GroupNode, TaskRef


def metric_key(metric: str, filter_name: str = "none") -> str:
    return f"{metric},{filter_name}"


def stderr_key(metric: str, filter_name: str = "none") -> str:
    return f"{metric}_stderr,{filter_name}"


def task_entry(task: str, scores: dict[str | tuple[str, str], tuple[float, Any]], *, alias: str | None = None,
               sample_len: int | None = None) -> dict[str, Any]:
    """``{"name", "alias", "sample_len", "<metric>,<filter>": value, "<metric>_stderr,<filter>": stderr}``.

    ``scores`` is keyed by metric name (filter ``none``) or by ``(metric, filter name)``.
    """
    entry: dict[str, Any] = {"name": task, "alias": alias or task}
    if sample_len is not None:
        entry["sample_len"] = sample_len
    for key, (value, stderr) in scores.items():
        metric, filter_name = key if isinstance(key, tuple) else (key, "none")
        entry[metric_key(metric, filter_name)] = value
        entry[stderr_key(metric, filter_name)] = stderr
    return entry


# -- groups -----------------------------------------------------------------------------------
def group_leaves(group: GroupNode) -> list[str]:
    """Leaf task names under ``group``, recursively in order; a task under two subgroups appears twice (lm-eval)."""
    out: list[str] = []
    for child in group.children:
        out.extend(group_leaves(child) if isinstance(child, GroupNode) else [child.name])
    return out


def child_name(child: GroupNode | TaskRef) -> str:
    return child.name


def groups_preorder(roots: list) -> list[GroupNode]:
    """Every group once, parents before children, in request order: the order lm-eval keeps its groups in."""
    seen: dict[str, GroupNode] = {}

    def visit(node: GroupNode) -> None:
        seen.setdefault(node.name, node)
        for child in node.children:
            if isinstance(child, GroupNode):
                visit(child)

    for root in roots:
        if isinstance(root, GroupNode):
            visit(root)
    return list(seen.values())


def groups_bottom_up(groups: list[GroupNode]) -> list[GroupNode]:
    """Children before parents, starting from the groups no other group lists: lm-eval's aggregation order."""
    children = {c.name for g in groups for c in g.children if isinstance(c, GroupNode)}
    out: dict[str, GroupNode] = {}

    def visit(node: GroupNode) -> None:
        if node.name in out:
            return
        for child in node.children:
            if isinstance(child, GroupNode):
                visit(child)
        out[node.name] = node

    for group in groups:
        if group.name not in children:
            visit(group)
    return list(out.values())


def _filters_for(metric: str, leaves: list[str], entries: dict[str, dict]) -> list[str]:
    found = set()
    for name in leaves:
        for key in entries.get(name, {}):
            if key.startswith(f"{metric},") and "_stderr" not in key:
                found.add(key[len(metric) + 1:])
    return sorted(found)


def pooled_stderr(stderrs: list[float], sizes: list[int]) -> float:
    """Pooled-variance stderr of a size-weighted mean of subtask means (lm-eval's ``pooled_sample_stderr``)."""
    total = sum(sizes)
    denominator = total - len(sizes)
    if denominator == 0:  # every subtask has one document: lm-eval divides by zero here
        return float("nan")
    variance = sum((n - 1) * se**2 * n for se, n in zip(stderrs, sizes)) / denominator
    return math.sqrt(variance / total)


def unweighted_stderr(stderrs: list[float]) -> float:
    """Stderr of the plain mean of k independent subtask means: sqrt(sum se²) / k."""
    return math.sqrt(sum(se**2 for se in stderrs)) / len(stderrs)


def group_entry(group: GroupNode, entries: dict[str, dict]) -> dict[str, Any]:
    """One group's results entry from its leaf tasks' entries, as lm-eval 0.4.13's ``Group.aggregate``."""
    out: dict[str, Any] = {"alias": group.alias or group.name, "name": group.name}
    if not group.aggregate_metric_list:
        return out
    leaves = group_leaves(group)
    out["sample_len"] = sum(entries[n].get("sample_len", 0) for n in leaves if n in entries)
    counts: dict[str, int] = {}
    for agg in group.aggregate_metric_list:
        filters = _filters_for(agg.metric, leaves, entries) if agg.filter_list is None else list(agg.filter_list)
        for filter_name in filters:
            key, skey = metric_key(agg.metric, filter_name), stderr_key(agg.metric, filter_name)
            values, sizes, stderrs = [], [], []
            for name in leaves:
                entry = entries.get(name, {})
                if key in entry:
                    values.append(entry[key])
                    sizes.append(entry.get("sample_len", 0))
                    if entry.get(skey) is not None:
                        stderrs.append(entry[skey])
            if not values:
                continue
            weights = sizes if agg.weight_by_size else [1] * len(sizes)
            out[key] = sum(v * w for v, w in zip(values, weights)) / sum(weights)
            counts[key] = sum(sizes)
            if len(stderrs) == len(values) and "N/A" not in stderrs:
                out[skey] = pooled_stderr(stderrs, sizes) if agg.weight_by_size else unweighted_stderr(stderrs)
            else:
                out[skey] = "N/A"
    if counts:
        out["sample_count"] = counts
    return out


def group_version(group: GroupNode) -> str:
    """lm-eval writes a group's ``metadata.version`` as a string, ``"N/A"`` without one."""
    return "N/A" if not group.metadata else str(group.metadata.get("version", "N/A"))


def _propagate(groups: list[GroupNode], out: dict[str, Any], merge) -> None:
    """Give each group (parents first, as lm-eval) the value ``merge`` makes of its direct children's."""
    for group in groups:
        values = [out[c.name] for c in group.children if c.name in out]
        merged = merge(group, values)
        if merged is not None:
            out[group.name] = merged


def _merge_shots(group, values):
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def _merge_higher_is_better(group, values):
    merged: dict[str, Any] = {}
    for value in values:
        for metric, better in value.items():
            if metric not in merged:
                merged[metric] = better
            elif merged[metric] is not None and merged[metric] != better:
                merged[metric] = None  # children disagree: lm-eval reports None
    return merged or None


def build_results(task_results: list[dict[str, Any]], config: dict[str, Any], started: float, finished: float,
                  *, groups: list[GroupNode] = (), skipped: dict[str, str] | None = None) -> dict:
    """Assemble the lm-eval-shaped document from per-task records and the requested group trees.

    Each record holds ``name``, ``scores`` ({metric or (metric, filter): (value, stderr)}), ``config`` (dict),
    ``version``, ``num_fewshot``, ``higher_is_better`` ({metric: bool}), ``n_original``, ``n_effective``
    and optionally ``alias``. ``groups`` are the requested trees (roots); ``skipped`` maps a task or group
    that was not run or not aggregated to why: such a group gets no numbers.
    """
    skipped = dict(skipped or {})
    entries: dict[str, dict] = {}
    configs, versions, shots, hib, samples = {}, {}, {}, {}, {}
    for record in task_results:
        name = record["name"]
        entries[name] = task_entry(name, record["scores"], alias=record.get("alias"), sample_len=record["n_effective"])
        configs[name] = record["config"]
        versions[name] = record["version"]
        shots[name] = record["num_fewshot"]
        hib[name] = record["higher_is_better"]
        samples[name] = {"original": record["n_original"], "effective": record["n_effective"]}
    all_groups = groups_preorder(list(groups))
    group_results = {}
    for group in groups_bottom_up(all_groups):
        if group.name in skipped:
            entries[group.name] = {"alias": group.alias or group.name, "name": group.name}
        else:
            entries[group.name] = group_entry(group, entries)
            if group.aggregate_metric_list:
                group_results[group.name] = entries[group.name]
        versions[group.name] = group_version(group)
    _propagate(all_groups, hib, _merge_higher_is_better)
    _propagate(all_groups, shots, _merge_shots)
    out: dict[str, Any] = {"results": entries}
    if group_results:
        out["groups"] = {name: entry for name, entry in entries.items() if name in group_results}
    out.update({
        "group_subtasks": {g.name: [child_name(c) for c in g.children] for g in all_groups},
        "configs": dict(sorted(configs.items())),
        "versions": dict(sorted(versions.items())),
        "n-shot": dict(sorted(shots.items())),
        "higher_is_better": dict(sorted(hib.items())),
        "n-samples": samples,
        "config": config,
        "date": started,
        "total_evaluation_time_seconds": str(finished - started),
    })
    if skipped:
        out["skipped"] = skipped
    return out


# -- the table --------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"  # as lm-eval's make_table (nan prints as "nan")
    return str(value)


def _hierarchy(group_subtasks: dict[str, list[str]], keys: list[str]) -> tuple[dict[str, int], list[str]]:
    """Depth of each name and the row order of lm-eval's ``make_table``: roots sorted, children sorted under them."""
    depth: dict[str, int] = {}
    order: list[str] = []
    available = set(keys)

    def visit(name: str, level: int) -> None:
        depth[name] = level
        if name in available:
            order.append(name)
        for child in sorted(group_subtasks.get(name, [])):
            visit(child, level + 1)

    children = {c for cs in group_subtasks.values() for c in cs}
    for name in sorted(group_subtasks):
        if name not in children:
            visit(name, 0)
    order.extend(k for k in sorted(available) if k not in depth)
    return depth, order


_HIDDEN = ("alias", "name", "sample_len", "sample_count")


def _table(results: dict[str, Any], column: str) -> str:
    title = "Groups" if column == "groups" else "Tasks"
    lines = [f"| {title} | Version | Filter | n-shot | Metric | | Value | | Stderr |",
             "|---|---|---|---:|---|---|---:|---|---:|"]
    skipped = results.get("skipped", {})
    depth, order = _hierarchy(results.get("group_subtasks", {}), list(results[column]))
    for name in order:
        entry = results[column][name]
        label = entry.get("alias", name)
        if depth.get(name, 0) > 0:
            label = " " * depth[name] + "- " + label
        version = str(results["versions"].get(name, "N/A"))
        shots = str(results.get("n-shot", {}).get(name, ""))
        hib = results.get("higher_is_better", {}).get(name, {})
        head = (label, version)
        if name in skipped and name in results.get("group_subtasks", {}):
            lines.append(f"| {label} | {version} |  | {shots} | no aggregate: {skipped[name]} |  |  |  |  |")
            continue
        for key, value in sorted((k, v) for k, v in entry.items() if k not in _HIDDEN):
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            arrow = {True: "↑", False: "↓"}.get(hib.get(metric), "")
            skey = stderr_key(metric, filt)
            if skey in entry:
                stderr = entry[skey]
                cells = ("±", "N/A" if stderr == "N/A" else _fmt(stderr))
            else:
                cells = ("", "")
            lines.append(f"| {' | '.join(head)} | {filt} | {shots} | {metric} | {arrow} | {_fmt(value)} | "
                         f"{' | '.join(cells)} |")
            head = ("", "")
    return "\n".join(lines)


def markdown_table(results: dict[str, Any]) -> str:
    """The tables lm-eval prints (``make_table``): every task and group, then a "Groups" table when there are groups.

    Rows as lm-eval's: roots sorted by name with their children sorted and indented under them
    (``" - name"``, one more space per level), one row per ``metric,filter`` key in sorted order, the
    name and version on the first row only; values and stderrs with 4 decimals. hfx writes the
    cells without lm-eval's column padding. Tasks and groups that were skipped are listed after.
    """
    text = _table(results, "results")
    if results.get("groups"):
        text += "\n\n" + _table(results, "groups")
    skipped = results.get("skipped") or {}
    if skipped:
        text += "\n\nSkipped:\n" + "\n".join(f"- {name}: {why}" for name, why in skipped.items())
    return text


def _json_default(value: Any):
    if hasattr(value, "item"):
        return value.item()
    return repr(value)


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class OutputPathError(ValueError):
    """A results path that cannot be written (a directory, or under a file or an unwritable folder)."""


def check_output_path(path: str | os.PathLike, what: str = "--output") -> Path:
    """Raise :class:`OutputPathError` (one line) unless a results file can be written at ``path``; return it.

    ``path`` must not be a directory, and its nearest existing parent must be a writable
    directory (missing folders below it are created when the file is written).
    """
    given = str(path)
    path = Path(path).expanduser()
    if given.endswith(("/", os.sep)) and not path.is_dir():
        raise OutputPathError(f"{what} {given!r} names a folder; give a file name, e.g. {str(path / 'results.json')!r}.")
    if str(path) in ("", ".") or path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a directory; give a file name, e.g. {str(path / 'results.json')!r}.")
    blocked = blocking_parent(path)
    if blocked is not None:
        parent, why = blocked
        if why == "file":
            raise OutputPathError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a directory.")
        raise OutputPathError(f"{what} {str(path)!r}: the directory {str(parent)!r} is not writable.")
    return path


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    return write_atomic(path, json.dumps(results, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def samples_path(output: str | os.PathLike, task: str) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}_samples_{task}.jsonl")


def write_samples(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """One JSON line per document: doc_id, doc, target, arguments, resps, and its metrics (lm-eval's keys)."""
    text = "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in records)
    return write_atomic(path, text)
