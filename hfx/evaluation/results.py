"""Results in lm-eval's JSON shape, a markdown table, per-document sample logs, atomic writes.

``build_results`` returns a dict readers of lm-eval output already understand::

    {"results":  {task: {"alias": task, "acc,none": 0.5, "acc_stderr,none": 0.1, ...}},
                           # "<metric>,<filter>": "none" unless the task has a filter_list
     "group_subtasks": {task: []},
     "configs":  {task: <task config>},
     "versions": {task: <metadata.version or "Yaml">},
     "n-shot":   {task: k},
     "higher_is_better": {task: {metric: bool}},
     "n-samples": {task: {"original": N, "effective": n}},
     "config":   {"model": ..., "batch_size": ..., "limit": ..., "random_seed": 0, "numpy_seed": 1234,
                  "torch_seed": S, "fewshot_seed": S, "model_identity": <cache key>},
     "date": <unix time>, "total_evaluation_time_seconds": "<s>"}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..safe_paths import blocking_parent


def metric_key(metric: str, filter_name: str = "none") -> str:
    return f"{metric},{filter_name}"


def stderr_key(metric: str, filter_name: str = "none") -> str:
    return f"{metric}_stderr,{filter_name}"


def task_entry(task: str, scores: dict[str | tuple[str, str], tuple[float, Any]]) -> dict[str, Any]:
    """``{"alias": task, "<metric>,<filter>": value, "<metric>_stderr,<filter>": stderr}`` for one task.

    ``scores`` is keyed by metric name (filter ``none``) or by ``(metric, filter name)``.
    """
    entry: dict[str, Any] = {"alias": task}
    for key, (value, stderr) in scores.items():
        metric, filter_name = key if isinstance(key, tuple) else (key, "none")
        entry[metric_key(metric, filter_name)] = value
        entry[stderr_key(metric, filter_name)] = stderr
    return entry


def build_results(task_results: list[dict[str, Any]], config: dict[str, Any], started: float, finished: float) -> dict:
    """Assemble the lm-eval-shaped document from per-task records.

    Each record holds ``name``, ``scores`` ({metric or (metric, filter): (value, stderr)}), ``config`` (dict),
    ``version``, ``num_fewshot``, ``higher_is_better`` ({metric: bool}), ``n_original``, ``n_effective``.
    """
    out: dict[str, Any] = {
        "results": {},
        "group_subtasks": {},
        "configs": {},
        "versions": {},
        "n-shot": {},
        "higher_is_better": {},
        "n-samples": {},
    }
    for record in task_results:
        name = record["name"]
        out["results"][name] = task_entry(name, record["scores"])
        out["group_subtasks"][name] = []
        out["configs"][name] = record["config"]
        out["versions"][name] = record["version"]
        out["n-shot"][name] = record["num_fewshot"]
        out["higher_is_better"][name] = record["higher_is_better"]
        out["n-samples"][name] = {"original": record["n_original"], "effective": record["n_effective"]}
    out["config"] = config
    out["date"] = started
    out["total_evaluation_time_seconds"] = str(finished - started)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(results: dict[str, Any]) -> str:
    """The table lm-eval prints: Tasks | Version | Filter | n-shot | Metric | | Value | | Stderr.

    As lm-eval's ``make_table``: one row per ``metric,filter`` key in sorted order, the task and
    its version on its first row only, the filter and n-shot on every row.
    """
    lines = ["| Tasks | Version | Filter | n-shot | Metric | | Value | | Stderr |",
             "|---|---|---|---:|---|---|---:|---|---:|"]
    for task, entry in results["results"].items():
        hib = results.get("higher_is_better", {}).get(task, {})
        head = (entry.get("alias", task), str(results["versions"].get(task, "")))
        shots = str(results["n-shot"].get(task, ""))
        for key, value in sorted(entry.items()):
            metric, _, filt = key.partition(",")
            if key == "alias" or metric.endswith("_stderr"):
                continue
            stderr = entry.get(stderr_key(metric, filt), "N/A")
            arrow = "↑" if hib.get(metric, True) else "↓"
            lines.append(f"| {' | '.join(head)} | {filt} | {shots} | {metric} | {arrow} | {_fmt(value)} | ± "
                         f"| {_fmt(stderr)} |")
            head = ("", "")
    return "\n".join(lines)


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
    path = Path(path).expanduser()
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
