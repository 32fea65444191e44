"""Results in lm-eval's JSON shape, a markdown table, per-document sample logs, atomic writes.

``build_results`` returns a dict readers of lm-eval output already understand::

    {"results":  {task: {"alias": task, "acc,none": 0.5, "acc_stderr,none": 0.1, ...}},
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


def metric_key(metric: str, filter_name: str = "none") -> str:
    return f"{metric},{filter_name}"


def stderr_key(metric: str, filter_name: str = "none") -> str:
    return f"{metric}_stderr,{filter_name}"


def task_entry(task: str, scores: dict[str, tuple[float, Any]]) -> dict[str, Any]:
    """``{"alias": task, "<metric>,none": value, "<metric>_stderr,none": stderr}`` for one task."""
    entry: dict[str, Any] = {"alias": task}
    for metric, (value, stderr) in scores.items():
        entry[metric_key(metric)] = value
        entry[stderr_key(metric)] = stderr
    return entry


def build_results(task_results: list[dict[str, Any]], config: dict[str, Any], started: float, finished: float) -> dict:
    """Assemble the lm-eval-shaped document from per-task records.

    Each record holds ``name``, ``scores`` ({metric: (value, stderr)}), ``config`` (dict),
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
    """The table lm-eval prints: Tasks | Version | n-shot | Metric | Value | ± Stderr."""
    lines = ["| Tasks | Version | n-shot | Metric | | Value | | Stderr |", "|---|---|---:|---|---|---:|---|---:|"]
    for task, entry in results["results"].items():
        hib = results.get("higher_is_better", {}).get(task, {})
        first = True
        for key, value in entry.items():
            if key == "alias" or "_stderr," in key:
                continue
            metric, _, filt = key.partition(",")
            stderr = entry.get(stderr_key(metric, filt), "N/A")
            arrow = "↑" if hib.get(metric, True) else "↓"
            head = (task, str(results["versions"].get(task, "")), str(results["n-shot"].get(task, ""))) if first else ("", "", "")
            lines.append(f"| {' | '.join(head)} | {metric} | {arrow} | {_fmt(value)} | ± | {_fmt(stderr)} |")
            first = False
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


def write_results(path: str | os.PathLike, results: dict[str, Any]) -> Path:
    return write_atomic(path, json.dumps(results, indent=2, default=_json_default, ensure_ascii=False) + "\n")


def samples_path(output: str | os.PathLike, task: str) -> Path:
    output = Path(output)
    return output.with_name(f"{output.stem}_samples_{task}.jsonl")


def write_samples(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """One JSON line per document: doc_id, doc, target, arguments, resps, and its metrics (lm-eval's keys)."""
    text = "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in records)
    return write_atomic(path, text)
