"""Sub-commands of the ``hfx`` CLI, one module each (see ``hfx/cli.py``)."""

from __future__ import annotations

import sys
from typing import NoReturn


def usage_error(command: str, message: str) -> NoReturn:
    """One line on stderr, ``hfx COMMAND: error: MESSAGE``, and exit code 2 (argparse's code for bad usage)."""
    print(f"hfx {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)
