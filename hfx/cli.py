"""The ``hfx`` command: thin sub-commands over the Python API.

Each sub-command lives in ``hfx/commands/<name>.py`` and exposes ``add_parser(subparsers)``,
which registers its arguments and sets ``func``; modules are imported only when listed here, so
``hfx --help`` stays fast and one broken command cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "plugins": "hfx.commands.plugins",
    "quickstart": "hfx.commands.quickstart",
    "finetune": "hfx.commands.finetune",
    "eval": "hfx.commands.evaluate",
    "convert-long": "hfx.commands.convert_long",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hfx",
        description="hfx: configurable transformers, long-context attention, LoRA/QLoRA fine-tuning and "
        "zero/few-shot evaluation on top of the Hugging Face ecosystem.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # the command is not part of this build yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
