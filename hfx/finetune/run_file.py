"""Run files: ``hfx finetune --config run.yaml`` reads FinetuneConfig fields from YAML or JSON.

Keys are FinetuneConfig field names (``lora_r``, not ``--lora-r``). Flags typed on the command line
override the file; argparse defaults never do, so the CLI records which flags were given
(:func:`track_given_flags`). Unknown keys and values of the wrong type are refused, named, before
anything is loaded.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from dataclasses import fields
from pathlib import Path

from .config import PACKING, FinetuneConfig, check_field_value

GIVEN = "_hfx_given_flags"  # the Namespace attribute holding the dests of the flags the user typed
#: fields that may come from the run file instead of the command line, but must come from one of them
REQUIRED = ("model", "data", "output")
#: the key only a run's own record (OUTPUT/hfx_finetune.json) holds: it marks a file written by a run
RECORD_MARK = "world_size"
#: skipped when a run's record is read back as a run file: the process count it ran on, and the
#: actions of that one invocation (replacing or continuing OUTPUT), which must never carry over to a new run
RECORDED_ONLY = (RECORD_MARK, "overwrite", "resume")
#: the file name endings --config reads, and as what
EXTENSIONS = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
#: older runs' records may hold a boolean where a field now takes a name; accepted from a run's record only
LEGACY_TYPES = {"packing": (bool,)}


class RunFileError(ValueError):
    """A run file that cannot be read, names unknown fields or gives a value of the wrong type."""


def load_run_file(path: str | Path) -> dict:
    """The FinetuneConfig values of a ``.yaml`` / ``.yml`` / ``.json`` file, checked (names and types)."""
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"--config {path}: no such file.")
    if path.suffix.lower() not in EXTENSIONS:
        raise RunFileError(f"--config {path}: the extension {path.suffix or '(none)'!r} is invalid; valid "
                           f"extensions: {list(EXTENSIONS)} (YAML or JSON).")
    text = path.read_text(encoding="utf-8")
    try:
        if EXTENSIONS[path.suffix.lower()] == "JSON":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except ValueError as exc:  # json.JSONDecodeError
        raise RunFileError(f"--config {path}: not valid JSON: {exc}") from None
    except Exception as exc:  # yaml.YAMLError: the message says where
        raise RunFileError(f"--config {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise RunFileError(f"--config {path}: must hold a mapping of FinetuneConfig field names to values, "
                           f"got {type(values).__name__}.")
    recorded = RECORD_MARK in values  # OUTPUT/hfx_finetune.json of an earlier run
    if recorded:
        values = {k: v for k, v in values.items() if k not in RECORDED_ONLY}
    return check_values(values, where=f"--config {path}", recorded=recorded)


def check_values(values: dict, where: str = "run file", recorded: bool = False) -> dict:
    """``values`` with every key a FinetuneConfig field and every value of its field's type (a copy).

    ``recorded``: the values come from a run's own OUTPUT/hfx_finetune.json, which may hold the older
    value types of :data:`LEGACY_TYPES`.
    """
    hints = typing.get_type_hints(FinetuneConfig)
    valid = [f.name for f in fields(FinetuneConfig)]
    unknown = [key for key in values if key not in hints]
    if unknown:
        hints_text = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1)
            hints_text.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RunFileError(f"{where}: unknown key(s) {', '.join(hints_text)}; valid keys: {valid}.")
    checked = {}
    for key, value in values.items():
        expected = hints[key]
        value = _coerced(value, expected)
        if key == "packing" and isinstance(value, bool) and not recorded:
            raise RunFileError(f"{where}: packing={value!r} is ambiguous (a boolean is read only from a run's own "
                               "hfx_finetune.json, where True meant 'wrapped'; a bare --packing means 'bfd'); "
                               f"valid values: {list(PACKING)}.")
        if not (_accepts(value, expected) or (recorded and isinstance(value, LEGACY_TYPES.get(key, ())))):
            raise RunFileError(f"{where}: {key}={value!r} is a {type(value).__name__}; expected {_describe(expected)}.")
        try:
            check_field_value(key, value)  # a name from a fixed list: refused here, at once and with the file named
        except ValueError as exc:
            raise RunFileError(f"{where}: {exc}") from None
        checked[key] = value
    return checked


def _coerced(value, expected):
    """YAML 1.1 reads ``2e-4`` (no dot) as a string: a float field takes it as the number it spells."""
    if isinstance(value, str) and _accepts(1.5, expected) and not _accepts("x", expected):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _accepts(value, expected) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, option) for option in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is typing.Any:
        return True
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin is list or expected is list:
        (item,) = typing.get_args(expected) or (typing.Any,)
        # a comma-separated string, as the flag takes it, is read by FinetuneConfig itself
        return (isinstance(value, list) and all(_accepts(v, item) for v in value)) or (
            item is str and isinstance(value, str))
    if origin is dict or expected is dict:
        return isinstance(value, dict)
    return isinstance(value, expected) if isinstance(expected, type) else True


def _describe(expected) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if expected is type(None):
        return "null"
    if origin is list:
        return "a list of " + _describe(typing.get_args(expected)[0]) + "s (or one comma-separated string)"
    return getattr(expected, "__name__", str(expected))


def track_given_flags(parser) -> None:
    """Make every option of ``parser`` record its dest in the parsed Namespace when the user types it.

    argparse fills in defaults first and calls an option's action only for what was typed, so the
    record tells a typed ``--lora-r 16`` from the default 16.
    """
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", GIVEN):
            continue
        action.__class__ = _tracking(action.__class__)


_TRACKING: dict[type, type] = {}


def _tracking(cls: type) -> type:
    if cls not in _TRACKING:
        def __call__(self, parser, namespace, values, option_string=None):
            given = set(getattr(namespace, GIVEN, ()))
            given.add(self.dest)
            setattr(namespace, GIVEN, given)
            return cls.__call__(self, parser, namespace, values, option_string)

        _TRACKING[cls] = type(f"Tracking{cls.__name__}", (cls,), {"__call__": __call__})
    return _TRACKING[cls]


def merged_values(cli: dict, given: set[str], run_file: str | None) -> dict:
    """The FinetuneConfig values of one invocation: the run file's, then the flags typed, then the CLI defaults.

    Raises :class:`RunFileError` when ``model`` / ``data`` / ``output`` come from neither.
    """
    from_file = load_run_file(run_file) if run_file else {}
    values = {key: value for key, value in cli.items() if key in given or key not in from_file}
    values.update({key: value for key, value in from_file.items() if key not in given})
    missing = [key for key in REQUIRED if values.get(key) is None]
    if missing:
        flags = ", ".join("--" + key for key in missing)
        raise RunFileError(f"the following arguments are required: {flags} (on the command line, or as "
                           f"{' / '.join(repr(k) for k in missing)} in a --config run file).")
    return values


def config_from_values(values: dict, given: set[str], run_file: str | None) -> FinetuneConfig:
    """``FinetuneConfig.from_dict(values)``; a value the run file gave that it refuses is reported with the file named.

    ``values`` as :func:`merged_values` returns them. A message that starts with a field name the run
    file set (and no typed flag overrode), e.g. ``lora_r must be a positive integer``, is prefixed
    ``--config FILE:``, as the run file's unknown keys and wrong types are.
    """
    try:
        return FinetuneConfig.from_dict(values)
    except ValueError as exc:
        if not run_file or isinstance(exc, RunFileError):
            raise
        from_file = set(load_run_file(run_file)) - set(given)
        first = re.match(r"\w+", str(exc))
        if first and first.group(0) in from_file:
            raise RunFileError(f"--config {run_file}: {exc}") from None
        raise


def config_from_run_file(path: str | Path, **overrides) -> FinetuneConfig:
    """A FinetuneConfig from a run file, ``overrides`` (field names) taking precedence: the Python API's ``--config``."""
    values = {**load_run_file(path), **check_values(overrides, where="overrides")}
    return config_from_values(values, set(overrides), str(path))
