"""``hfx plugins``: every installed component, by kind, with the distribution that provides it."""

from __future__ import annotations

import argparse

HELP = "list installed components (attention, norm, position, ffn, tasks)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help=HELP,
        description="List every component found through the hfx.<kind> entry-point groups, with the "
        "distribution and version that provides it. Plugins that fail to load are shown with their error.",
    )
    from hfx.registry import KINDS  # metadata and dataclasses only

    parser.add_argument("--kind", choices=KINDS, help="only this kind")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from hfx.commands import usage_error
    from hfx.registry import KINDS, registry

    if args.kind is not None and args.kind not in KINDS:
        usage_error("plugins", f"unknown kind {args.kind!r}; valid kinds: {list(KINDS)}")
    table = Table(title="hfx components")
    for column in ("kind", "name", "distribution", "version", "status"):
        table.add_column(column)
    broken = 0
    for info in registry.describe():
        if args.kind and info.kind != args.kind:
            continue
        status = "ok" if info.error is None else f"error: {info.error}"
        broken += info.error is not None
        table.add_row(info.kind, info.name, info.distribution, info.version, status)
    Console(width=160).print(table)
    return 1 if broken else 0
