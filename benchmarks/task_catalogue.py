"""How much of lm-evaluation-harness's bundled task catalogue ``hfx eval`` accepts, and why the rest is refused.

    python benchmarks/task_catalogue.py                      # both modes, writes benchmarks/results/task_catalogue.json
    python benchmarks/task_catalogue.py --modes code --reasons /tmp/coverage_reasons.md

Runs :func:`hfx.evaluation.validation.validate` (the checks ``hfx eval`` applies before a model
loads, no dataset read) over ``lm_eval/tasks`` of the installed lm-eval, without and with
``--allow-code``: accepted tasks, resolved groups, validator errors (must be 0), seconds, and
the most frequent refusal causes with a task showing each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfx.evaluation.catalogue import TaskIndex  # noqa: E402
from hfx.evaluation.results import write_atomic  # noqa: E402
from hfx.evaluation.validation import ACCEPTED, ERROR, reason_table, validate  # noqa: E402


def lm_eval_tasks() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("lm_eval is not installed (pip install 'lm_eval==0.4.13')")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def measure(folder: Path, allow_code: bool, top: int) -> dict:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = TaskIndex([folder], allow_code=allow_code, plugins=False)
    indexed = time.perf_counter() - started
    verdicts = validate(index)
    elapsed = time.perf_counter() - started
    out = {"allow_code": allow_code, "seconds_index": round(indexed, 2), "seconds_total": round(elapsed, 2)}
    for kind in ("task", "group", "tag"):
        of_kind = [v for v in verdicts if v.kind == kind]
        accepted = sum(v.status == ACCEPTED for v in of_kind)
        out[kind] = {"total": len(of_kind), "accepted": accepted, "errors": sum(v.status == ERROR for v in of_kind),
                     "fraction": round(accepted / len(of_kind), 4) if of_kind else None}
    out["reasons"] = [{"count": n, "reason": reason, "example": example}
                      for n, reason, example in reason_table(verdicts, top)]
    refused_groups = [v for v in verdicts if v.kind == "group" and v.status != ACCEPTED]
    # a group whose tree resolves but holds a refused member (a missing optional package, image inputs...)
    out["group"]["tree_resolved"] = out["group"]["accepted"] + sum(bool(v.refused_members) for v in refused_groups)
    out["refused_groups"] = [{"name": v.name, "reason": v.reason[:300]} for v in refused_groups]
    out["errors"] = [{"name": v.name, "kind": v.kind, "reason": v.reason} for v in verdicts if v.status == ERROR][:50]
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["# hfx coverage of lm-eval 0.4.13's bundled tasks", "",
             "`python benchmarks/task_catalogue.py` (same as `hfx tasks validate --include-path <lm_eval>/tasks "
             "[--allow-code]`)", "",
             "A group is *resolved* when its whole membership resolves and every member is accepted; *tree "
             "resolved* counts the groups whose membership resolves (some members refused, with their reason).", "",
             "| mode | tasks accepted | groups resolved | group trees resolved | tags resolved | errors | seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        t, g, tag = row["task"], row["group"], row["tag"]
        lines.append(f"| {'--allow-code' if row['allow_code'] else 'default'} | {t['accepted']}/{t['total']} "
                     f"({t['fraction']:.1%}) | {g['accepted']}/{g['total']} | {g['tree_resolved']}/{g['total']} | "
                     f"{tag['accepted']}/{tag['total']} | "
                     f"{t['errors'] + g['errors'] + tag['errors']} | {row['seconds_total']} |")
    for row in rows:
        lines += ["", f"## Refused tasks by cause ({'--allow-code' if row['allow_code'] else 'default'})", "",
                  "| tasks | cause | example |", "|---|---|---|"]
        lines += [f"| {r['count']} | {r['reason'].replace('|', '/')} | {r['example']} |" for r in row["reasons"]]
        if row["refused_groups"]:
            lines += ["", "Groups not resolved:", ""]
            lines += [f"- {g['name']}: {g['reason'].replace('|', '/')}" for g in row["refused_groups"]]
        if row["errors"]:
            lines += ["", "Validator errors (bugs):", ""] + [f"- {e['kind']} {e['name']}: {e['reason']}"
                                                           for e in row["errors"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="default,code", help="comma-separated: default, code")
    parser.add_argument("--top", type=int, default=20, help="refusal causes listed per mode")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "task_catalogue.json"))
    parser.add_argument("--reasons", default=None, help="also write the table as markdown here")
    args = parser.parse_args()
    folder = lm_eval_tasks()
    rows = []
    for mode in args.modes.split(","):  # each mode written as soon as it is measured
        rows.append(measure(folder, mode == "code", args.top))
        text = markdown(rows)
        print(text, flush=True)
        write_atomic(args.output, json.dumps({"lm_eval_tasks": str(folder), "rows": rows}, indent=1) + "\n")
        if args.reasons:
            write_atomic(args.reasons, text)


if __name__ == "__main__":
    main()
