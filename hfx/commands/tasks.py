"""``hfx tasks``: list the tasks, groups and tags hfx knows, and validate them without a model or data."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "list task/group/tag names, or validate task files without a model (what hfx eval accepts)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tasks",
        help=HELP,
        description="Tasks, groups and tags from --include-path folders and hfx.tasks plugins. `list` names them; "
        "`validate` checks each config as hfx eval does before a model loads (keys, filters, metrics, output "
        "type, templates, !function hooks under --allow-code), reading no dataset.",
    )
    sub = parser.add_subparsers(dest="tasks_command", metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--include-path", action="append", default=[],
                        help="directory (or file) of task YAMLs; repeatable")
    common.add_argument("--json", default=None, metavar="FILE", help="also write the records as JSON here (atomically)")
    listing = sub.add_parser("list", parents=[common], help="every task, group and tag: kind, output type, source file")
    listing.set_defaults(func=run_list)
    check = sub.add_parser("validate", parents=[common],
                           help="check configs without a model or dataset; counts and one reason per refused task")
    check.add_argument("--tasks", default=None, help="comma-separated task, group or tag names (default: all)")
    check.add_argument("--allow-code", action="store_true",
                       help="import `!function` hooks (runs Python from the task folders) and check them")
    check.add_argument("--quiet", action="store_true", help="counts only, no reason per refused task")
    check.set_defaults(func=run_validate)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _index(args, allow_code: bool):
    import warnings

    from hfx.commands import usage_error
    from hfx.evaluation.catalogue import TaskIndex
    from hfx.evaluation.templates import TaskError

    if args.json:
        from hfx.evaluation.results import OutputPathError, check_output_path

        try:
            check_output_path(args.json, "--json")
        except OutputPathError as exc:
            usage_error("tasks", str(exc))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # broken files are reported as refused records
            return TaskIndex(args.include_path, allow_code=allow_code)
    except TaskError as exc:
        usage_error("tasks", str(exc))


def _write_json(path: str, records: list[dict]) -> None:
    from hfx.evaluation.results import write_atomic

    write_atomic(path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def run_list(args: argparse.Namespace) -> int:
    from hfx.evaluation.validation import list_entries

    records = list_entries(_index(args, allow_code=False))
    for record in records:
        print(f"{record['name']}\t{record['kind']}\t{record.get('output_type') or '-'}\t{record.get('source') or '-'}")
    counts = {kind: sum(r["kind"] == kind for r in records) for kind in ("task", "group", "tag")}
    print(f"{counts['task']} tasks, {counts['group']} groups, {counts['tag']} tags", file=sys.stderr)
    if args.json:
        _write_json(args.json, records)
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from hfx.commands import usage_error
    from hfx.evaluation.templates import TaskError
    from hfx.evaluation.validation import summary_lines, validate

    names = None
    if args.tasks is not None:
        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        if not names:
            usage_error("tasks", f"--tasks {args.tasks!r} names no task; give comma-separated task, group or tag names")
    index = _index(args, allow_code=args.allow_code)
    try:
        verdicts = validate(index, names)
    except TaskError as exc:  # an unknown name: the closest known ones
        usage_error("tasks", str(exc))
    for line in summary_lines(verdicts, reasons=not args.quiet):
        print(line)
    if args.json:
        _write_json(args.json, [v.to_dict() for v in verdicts])
    return 0 if all(v.accepted for v in verdicts) else 1
