"""Writing and removing folders without losing what hfx did not write.

One place for the three things every command that writes a folder needs: can the path be created
(:func:`blocking_parent`), remove one entry without following a link (:func:`remove_entry`), and
replace a folder atomically while keeping files someone else put in it (:func:`replace_folder`).
Standard library only: the CLIs call these before torch is imported.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("hfx")


def blocking_parent(path: str | os.PathLike) -> tuple[Path, str] | None:
    """Why the missing ``path`` could not be created: ``(ancestor, "file" | "unwritable")``, or None.

    The nearest existing ancestor decides: it must be a folder this process may write into.
    """
    for parent in Path(path).parents:  # a relative path ends at ".", which exists
        if parent.exists():
            if not parent.is_dir():
                return parent, "file"
            if not os.access(parent, os.W_OK | os.X_OK):
                return parent, "unwritable"
            return None
    return None


def remove_entry(path: Path) -> None:
    """Remove a file, link or folder; a link is unlinked, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def replace_folder(target: Path, save: Callable[[str], object]) -> None:
    """``save(tmp)`` into a sibling temp folder, then swap it in for ``target``.

    At every moment ``target`` is the complete old folder, the complete new one, or absent. From
    the old folder (moved aside to ``TARGET.old``) only the names this save wrote are removed (the
    same ``save_pretrained`` calls write the same names); anything else is kept in ``TARGET.kept``
    (``.kept-2``, ...), with a warning naming it.
    """
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    if tmp.is_symlink():
        tmp.unlink()  # never save through a link
    shutil.rmtree(tmp, ignore_errors=True)  # a half-written save of an interrupted run
    save(str(tmp))
    written = {entry.name for entry in tmp.iterdir()}
    _discard_aside(old, written, target)  # left by a save interrupted after moving the folder aside
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(tmp, target)
    _discard_aside(old, written, target)


def _discard_aside(aside: Path, names: set[str], target: Path) -> None:
    if aside.is_symlink() or aside.is_file():
        aside.unlink()
        return
    if not aside.exists():
        return
    for entry in aside.iterdir():
        if entry.name in names:
            remove_entry(entry)
    left = sorted(entry.name for entry in aside.iterdir())
    if not left:
        aside.rmdir()
        return
    kept, number = target.with_name(target.name + ".kept"), 1
    while kept.exists() or kept.is_symlink():
        number += 1
        kept = target.with_name(f"{target.name}.kept-{number}")
    os.replace(aside, kept)
    shown = left if len(left) <= 8 else left[:8] + [f"... {len(left) - 8} more"]
    logger.warning("the previous %s held %s, which hfx did not write; they were not deleted and are now in %s.",
                   target, shown, kept)
