"""Sub-commands of the ``hfx`` CLI, one module each (see ``hfx/cli.py``)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: ...)" to an option's help unless it has no default or its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def usage_error(command: str, message: str) -> NoReturn:
    """One line on stderr, ``hfx COMMAND: error: MESSAGE``, and exit code 2 (argparse's code for bad usage)."""
    print(f"hfx {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)
