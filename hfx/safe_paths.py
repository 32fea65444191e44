"""Writing and removing folders without losing what hfx did not write.

One place for what every command that writes a folder needs: can the path be created
(:func:`blocking_parent`), remove one entry without following a link (:func:`remove_entry`), and
replace a folder atomically while keeping files someone else put in it (:func:`replace_folder`).
Commands whose output folder lists what they wrote in a manifest (``hfx export``, ``hfx convert-long``)
check it with :func:`check_replaceable_output` and rename their new folder in with :func:`swap_folder_in`,
worded by their :class:`ManifestOutput`. Standard library only: the CLIs call these before torch is imported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
    logger.warning("the previous %s held %s, which hfx did not write; they were not deleted and are now in %s.",
                   target, shown_names(left), kept)


def shown_names(names: Iterable[str], limit: int = 8) -> str:
    """``names`` sorted, as a list for a message: at most ``limit`` of them, then how many more."""
    names = sorted(names)
    return str(names if len(names) <= limit else names[:limit] + [f"... {len(names) - limit} more"])


@dataclass(frozen=True)
class ManifestOutput:
    """How a command that marks its output folder with a manifest words its refusals.

    ``check_replaceable_output`` replaces only a folder the command wrote (its ``manifest`` lists
    every other entry); the fields are the words its messages use.
    """

    error: type[Exception]  # raised for every refusal
    name: str  # how messages name the folder: "output", "OUT_DIR"
    folder: str  # ... where they call it a folder: "output folder", "OUT_DIR"
    manifest: str  # the file listing what was written ("files": [...])
    writer: str  # "... which {writer} did not write": "convert-long", "hfx export"
    made: str  # "an earlier {made}": "conversion", "export"
    foreign_folder: str  # "--overwrite: {path} {foreign_folder} (no readable manifest)"
    file_hint: str  # "give a folder to {file_hint}"


def check_replaceable_output(path: Path, overwrite: bool, rules: ManifestOutput) -> list[str]:
    """The entries an overwrite replaces (empty for a new or empty folder); refuses anything else, naming it.

    Refused: a symbolic link (whatever it points to: the new folder is renamed into place, which would
    replace the link rather than write into the folder it names), a file, a path that cannot be
    created; a non-empty folder without ``overwrite``; with it, a folder without a readable manifest
    or holding entries the manifest does not list. Nothing is removed here.
    """
    path = Path(path)
    if path.is_symlink():
        raise rules.error(f"{rules.name} {path} is a symbolic link (to {os.readlink(path)}); give the folder itself "
                          f"({path.resolve()}) or another folder. Nothing was written.")
    if path.exists() and not path.is_dir():
        raise rules.error(f"{rules.name} {path} is a file; give a folder to {rules.file_hint}.")
    if not path.exists():
        blocked = blocking_parent(path)
        if blocked is not None:
            raise rules.error(f"{rules.name} {path} cannot be created: {blocked[0]} is not a writable folder.")
        return []
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return []
    if not overwrite:
        raise rules.error(f"{rules.folder} {path} is not empty ({shown_names(entries)}); pass --overwrite to replace "
                          f"an earlier {rules.made}, or choose another folder. Nothing was written.")
    try:
        written = json.loads((path / rules.manifest).read_text(encoding="utf-8"))["files"]
        if not isinstance(written, list):
            raise TypeError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise rules.error(f"--overwrite: {path} {rules.foreign_folder} (no readable {rules.manifest}); nothing was "
                          "deleted. Choose another folder.") from None
    foreign = [name for name in entries if name != rules.manifest and name not in written]
    if foreign:
        raise rules.error(f"--overwrite: {path} holds {shown_names(foreign)}, which {rules.writer} did not write; "
                          "nothing was deleted. Move them elsewhere or choose another folder.")
    return entries


def swap_folder_in(new: Path, path: Path, replaced: list[str], rules: ManifestOutput) -> None:
    """Rename ``new`` to ``path``; an earlier output there is moved aside first.

    Afterwards only ``replaced`` (what :func:`check_replaceable_output` found) is removed from the
    moved-aside folder, and then the folder once empty. Anything else (put there after the check) is
    not deleted: the folder stays aside, and a warning names it.
    """
    new, path = Path(new), Path(path)
    if not path.exists():
        os.replace(new, path)
        return
    if not replaced:  # an empty folder
        try:
            path.rmdir()
        except OSError:
            raise rules.error(f"{rules.folder} {path} is no longer empty; nothing was deleted. Choose another "
                              "folder.") from None
        os.replace(new, path)
        return
    aside = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, aside)
    try:
        os.replace(new, path)
    except OSError:
        os.replace(aside, path)  # put the earlier output back
        raise
    for name in replaced:
        remove_entry(aside / name)
    left = sorted(entry.name for entry in aside.iterdir())
    if left:
        # stacklevel: this function, the command's function, its caller
        warnings.warn(f"the earlier {rules.made} in {path} also held {shown_names(left)}, which {rules.writer} did "
                      f"not write; they were not deleted and are in {aside}.", stacklevel=3)
    else:
        aside.rmdir()
