"""The ``hfx`` command: thin sub-commands over the Python API.

Each sub-command lives in ``hfx/commands/<name>.py`` and exposes ``add_parser(subparsers)``,
which registers its arguments and sets ``func``. Only the command being run has its parser built
(its module's ``add_parser`` may import what its choices need); every other command is listed by
the one-line summary its module declares (``HELP``, else the first line of its docstring). So
``hfx --help`` imports no command's dependencies, neither torch nor transformers, and one broken
command cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS = {
    "plugins": "hfx.commands.plugins",
    "quickstart": "hfx.commands.quickstart",
    "finetune": "hfx.commands.finetune",
    "eval": "hfx.commands.evaluate",
    "tasks": "hfx.commands.tasks",
    "convert-long": "hfx.commands.convert_long",
    "export": "hfx.commands.export",
}


DESCRIPTION = (
    "hfx: configurable transformers, long-context attention, LoRA/QLoRA fine-tuning and zero/few-shot "
    "evaluation on top of the Hugging Face ecosystem."
)


def _load_command(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        return None  # the command is not part of this build


def command_summary(module) -> str:
    """The one line ``hfx --help`` shows for a command module, without building its parser."""
    summary = getattr(module, "HELP", None)
    if summary:
        return summary
    first = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    _, sep, rest = first.partition(": ")
    return (rest if sep and first.startswith("``hfx") else first).replace("``", "").rstrip(".")


def _selected_command(argv: list[str]) -> str | None:
    """The sub-command argparse will pick: the first argument that does not start with ``-``."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``hfx`` parser; with ``argv``, only the command named there gets its full parser.

    Without ``argv`` every command's parser is built (tests and documentation use that).
    """
    from hfx import __version__

    parser = argparse.ArgumentParser(prog="hfx", description=DESCRIPTION, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"hfx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    selected = None if argv is None else _selected_command(argv)
    for name, module_name in COMMANDS.items():
        module = _load_command(module_name)
        if module is None:
            continue
        if argv is None or name == selected:
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=command_summary(module), add_help=False)
    for command_parser in sub.choices.values():
        command_parser.allow_abbrev = False  # `--max-step` must not silently mean `--max-steps`
    return parser


#: What each command says when it is interrupted (Ctrl-C), instead of a traceback.
INTERRUPTED = {
    "finetune": "the newest complete checkpoint is kept; the same command with --resume continues from it",
    "eval": "results computed so far are cached; the same command continues where it stopped",
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as ``hfx: warning: ...`` lines: a user of the command needs the text, not hfx's source line."""
    return f"hfx: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help()
            return 2
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            hint = INTERRUPTED.get(args.command)
            print(f"hfx {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 130  # the shell's code for SIGINT
    finally:
        warnings.formatwarning = previous  # ``main`` called in-process leaves the caller's format alone


if __name__ == "__main__":
    sys.exit(main())
