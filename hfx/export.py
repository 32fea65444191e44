"""``hfx export``: a model folder that loads with ``trust_remote_code=True`` where hfx is not installed.

An hfx checkpoint names its blocks (``norm_type="rmsnorm"``, ``attention_type="hfx_sliding_window"``, ...)
and the code behind those names lives in hfx and in plugin packages found through entry points. An
export carries that code with the weights: the hfx modules the model classes import, and exactly the
plugins its config uses, copied flat into the folder and named in ``config.json``'s ``auto_map``.

transformers' remote-code loader copies the file an ``auto_map`` entry names and, recursively, the
sibling files it imports as ``from .name import ...`` (the only relative form it follows; ``from . import
name``, ``from ..pkg`` and absolute ``import hfx_norms`` are not). So every copied module is rewritten
on its syntax tree: each import of hfx or of a plugin package becomes ``from .<flat module> import ...``,
a module imported as a module object is bound through that module's ``_hfx_export_self``, and the
entry-point registry is replaced by a static one listing the exported components. Everything else in
the sources is kept byte for byte.

The folder is built next to ``OUT_DIR`` and renamed into place; ``hfx_export.json`` lists what was
written, so ``overwrite`` replaces only an earlier export that holds nothing else.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .safe_paths import ManifestOutput, check_replaceable_output, swap_folder_in

#: Written into every export: what it holds (``files``), where each module and component came from.
MANIFEST_FILE = "hfx_export.json"
#: Bound at the top of every copied module that another one imports as a module object.
SELF_NAME = "_hfx_export_self"
#: Tokenizer and processor files copied as they are, when the model folder has them.
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
)
#: Heads that take any hfx base model's weights (their own layer is new), offered besides the saved one.
SHARED_BASE_HEADS = (
    "AutoModelForSequenceClassification", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering",
    "AutoModelForMultipleChoice",
)
#: Source that reads files next to itself cannot be carried by a flat copy of ``.py`` files.
_DATA_FILE_NAMES = {"__file__", "__path__"}
_DATA_FILE_MODULES = {"importlib.resources", "pkgutil", "pkg_resources", "importlib_resources"}
CORE_PACKAGE = "hfx"
#: ``model_type`` of an export. Not "hfx": transformers prefers a model type registered in-process over an
#: ``auto_map``, even with ``trust_remote_code=True``, so where hfx is imported an export named "hfx" would
#: silently run the installed hfx code instead of its own.
EXPORT_MODEL_TYPE = "hfx_export"
#: What hfx runs leave next to a model: ``hfx finetune`` (hfx.finetune.train RUN_FILE, RESULTS_FILE), pre-training
#: (hfx.pretraining RUN_ARGS_FILE), Trainer. Named here, not imported: those modules import datasets and Trainer.
TRAINING_FILES = ("hfx_finetune.json", "hfx_finetune_results.json", "pretrain_args.json", "trainer_state.json",
                  "all_results.json", "train_results.json")


class ExportError(ValueError):
    """An export that cannot be made as asked (input, output or a component's source); nothing was written."""


#: How OUT_DIR is checked and replaced (:mod:`hfx.safe_paths`), and named in the messages.
OUTPUT = ManifestOutput(error=ExportError, name="OUT_DIR", folder="OUT_DIR", manifest=MANIFEST_FILE,
                        writer="hfx export", made="export", foreign_folder="is not an hfx export",
                        file_hint="export to")


# --------------------------------------------------------------------------------------------------
# Which module files an export needs, and how their imports are rewritten


@dataclass
class SourceModule:
    """One module copied into the export: its import name, source file and file name there."""

    name: str
    path: Path
    flat: str
    is_package: bool
    source: str = ""
    tree: ast.Module | None = None
    # (import node, its replacement), found while the closure was followed; imports not listed stay as they are
    edits: list[tuple[ast.Import | ast.ImportFrom, str]] = field(default_factory=list)

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def flat_name(module: str) -> str:
    """File stem of ``module`` in the export: ``hfx.modeling_hfx`` -> ``modeling_hfx``,
    ``hfx_norms.rmsnorm`` -> ``hfx_norms__rmsnorm`` (double underscores keep the package visible)."""
    parts = module.split(".")
    if parts[0] == CORE_PACKAGE:
        parts = parts[1:]
    if not parts:
        raise ExportError(f"the package {CORE_PACKAGE!r} itself (its __init__) is never exported; import from its "
                          "modules instead")
    return "__".join(parts)


class ModuleSet:
    """The import closure of some start modules over the *internal* packages (hfx and plugin packages).

    Every import statement anywhere in a module (functions included: transformers copies those too) is
    followed; imports of other packages (torch, transformers, ...) stay as they are and are requirements.
    """

    def __init__(self, internal: set[str]):
        self.internal = set(internal) | {CORE_PACKAGE}
        self.modules: dict[str, SourceModule] = {}
        self.self_imported: set[str] = set()  # flat names some module imports as a module object
        self.requirements: set[str] = set()

    def is_internal(self, module: str) -> bool:
        return module.split(".")[0] in self.internal

    def add(self, module: str, why: str) -> SourceModule:
        if module in self.modules:
            return self.modules[module]
        found = _locate(module, why)
        flat = flat_name(module)
        clash = next((m for m in self.modules.values() if m.flat == flat), None)
        if clash is not None or not flat.isidentifier():
            raise ExportError(f"module {module} ({why}) would be copied as {flat}.py, which "
                              f"{'is not a valid module name' if clash is None else f'{clash.name} already is'}")
        found.source = found.path.read_text(encoding="utf-8")
        try:
            found.tree = ast.parse(found.source, filename=str(found.path))
        except SyntaxError as exc:
            raise ExportError(f"module {module} ({why}) does not parse: {exc}") from None
        _refuse_data_files(found, why)
        self.modules[module] = found
        contexts = _import_contexts(found.tree)
        for node in ast.walk(found.tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            context = contexts.get(id(node))
            if context == "type_checking":  # never runs; following it could pull in half of hfx
                if self.resolve(found, node) != _KEEP:
                    found.edits.append((node, "pass  # hfx export: a type-checking import of hfx code that is not "
                                              "exported"))
                continue
            try:
                resolved = self.resolve(found, node)
                for target, _ in resolved:
                    if target is not None:
                        self.add(target, f"imported by {module}")
            except ExportError:
                if context != "guarded":
                    raise
                continue  # `try: import optional except ImportError:` behaves as without it: left as it is
            if resolved != _KEEP:
                found.edits.append((node, "; ".join(statement for _, statement in resolved)))
        return found

    def resolve(self, module: SourceModule, node: ast.Import | ast.ImportFrom) -> list[tuple[str | None, str | None]]:
        """``[(internal module it needs, replacement statement)]`` for one import; ``[(None, None)]`` keeps it.

        The replacement is None for imports left as they are; a bare ``import hfx.x`` (which binds the
        package name ``hfx``) cannot be flattened and is refused, naming file and line.
        """
        where = f"{module.path}:{node.lineno}"
        if isinstance(node, ast.Import):
            out = []
            for alias in node.names:
                if not self.is_internal(alias.name):
                    self.requirements.add(alias.name.split(".")[0])
                    out.append((None, f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")))
                    continue
                if alias.asname is None or alias.name == CORE_PACKAGE:
                    raise ExportError(f"{where}: `import {alias.name}` binds a package name, which a flat export "
                                      f"cannot provide; write `from {alias.name.rpartition('.')[0] or alias.name} "
                                      f"import ...` or `import {alias.name} as name`")
                out.append((alias.name, self._module_alias(alias.name, alias.asname)))
            if all(target is None for target, _ in out):
                return _KEEP
            return out
        if node.level:
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.package)
        else:
            base = node.module or ""
        if not self.is_internal(base):
            if base.split(".")[0] != "__future__":
                self.requirements.add(base.split(".")[0])
            return _KEEP
        out = []
        for alias in node.names:
            local = alias.asname or alias.name
            if alias.name == "*":
                out.append((base, f"from .{flat_name(base)} import *"))
            elif _submodule_exists(base, alias.name) and not _init_binds(base, alias.name):
                # as Python does: the package's attribute first, its submodule only when the package has none
                out.append((f"{base}.{alias.name}", self._module_alias(f"{base}.{alias.name}", local)))
            elif base == CORE_PACKAGE:
                out.append(self._core_attribute(alias.name, local, where))
            else:
                rename = f" as {alias.asname}" if alias.asname else ""
                out.append((base, f"from .{flat_name(base)} import {alias.name}{rename}"))
        return _merge_imports(out)

    def _module_alias(self, module: str, local: str) -> str:
        flat = flat_name(module)
        self.self_imported.add(flat)
        return f"from .{flat} import {SELF_NAME} as {local}"

    def _core_attribute(self, name: str, local: str, where: str) -> tuple[str | None, str]:
        """``from hfx import name``: the hfx module that defines ``name`` (hfx's own ``__init__`` is not exported:
        it installs import hooks), or a literal it assigns (``__version__``)."""
        for node in _init_tree(CORE_PACKAGE).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return f"hfx.{node.module}", f"from .{flat_name('hfx.' + node.module)} import {alias.name} as {local}"
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                if any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                    return None, f"{local} = {node.value.value!r}"
        value = getattr(importlib.import_module(CORE_PACKAGE), name, None)  # hfx's lazy attributes (classes)
        defined_in = getattr(value, "__module__", None)
        if defined_in and defined_in.startswith(CORE_PACKAGE + "."):
            return defined_in, f"from .{flat_name(defined_in)} import {name} as {local}"
        raise ExportError(f"{where}: `from hfx import {name}`: hfx's __init__ is not exported and {name!r} is "
                          "not found in an hfx module; import it from the module that defines it")

    def rewritten(self, module: SourceModule) -> str:
        """The module's source with each internal import replaced in place (everything else untouched): the
        replacements :meth:`add` found."""
        lines = module.source.splitlines(keepends=True)
        # Byte offsets (ast columns are UTF-8 byte offsets), applied from the end so earlier ones stay valid.
        encoded = [line.encode("utf-8") for line in lines]
        for node, text in sorted(module.edits, key=lambda e: (e[0].lineno, e[0].col_offset), reverse=True):
            first, last = node.lineno - 1, node.end_lineno - 1
            head, tail = encoded[first][: node.col_offset], encoded[last][node.end_col_offset :]
            if len(head) + len(text) > 110 and ";" not in text and text.startswith("from ."):
                start, _, names = text.partition(" import ")
                indent = " " * (len(head) + 4)
                text = f"{start} import (\n" + "".join(f"{indent}{n},\n" for n in names.split(", ")) + (
                    " " * len(head) + ")")
            encoded[first : last + 1] = [head + text.encode("utf-8") + tail]
        text = b"".join(encoded).decode("utf-8")
        if module.flat in self.self_imported:
            text = _insert_self_reference(text)
        header = (f"# Copied by `hfx export` from {module.name} ({module.path.name}); imports of hfx and its plugins\n"
                  "# were rewritten to the modules of this folder.\n")
        return header + text


#: What :meth:`ModuleSet.resolve` returns for an import left as it is.
_KEEP = [(None, None)]
_IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def _import_contexts(tree: ast.Module) -> dict[int, str]:
    """``id(import node) -> "type_checking" | "guarded"`` for imports under ``if TYPE_CHECKING:`` or in the body of
    a ``try`` whose handlers catch ImportError (an optional dependency)."""
    contexts: dict[int, str] = {}

    def mark(nodes, label):
        for statement in nodes:
            for node in ast.walk(statement):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    contexts.setdefault(id(node), label)

    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                mark(node.body, "type_checking")
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            caught = set()
            for handler in node.handlers:
                kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                caught.update("BaseException" if k is None else getattr(k, "id", getattr(k, "attr", "")) for k in kinds)
            if caught & _IMPORT_ERRORS:
                mark(node.body, "guarded")
    return contexts


def _merge_imports(statements: list[tuple[str | None, str]]) -> list[tuple[str | None, str]]:
    """Neighbouring ``from .x import a`` and ``from .x import b`` as one ``from .x import a, b``."""
    merged: list[tuple[str | None, str]] = []
    for target, statement in statements:
        if merged and statement.startswith("from .") and " import " in statement:
            head, _, names = statement.partition(" import ")
            last_head, _, last_names = merged[-1][1].partition(" import ")
            if head == last_head and "*" not in (names, last_names) and merged[-1][1].startswith("from ."):
                merged[-1] = (merged[-1][0], f"{head} import {last_names}, {names}")
                continue
        merged.append((target, statement))
    return merged


def set_class_constant(text: str, class_name: str, attribute: str, value) -> str:
    """``text`` with the constant assigned to ``class_name.attribute`` (``model_type = "hfx"``) replaced by ``value``."""
    tree = ast.parse(text)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for statement in node.body:
                targets = statement.targets if isinstance(statement, ast.Assign) else (
                    [statement.target] if isinstance(statement, ast.AnnAssign) else [])
                if any(isinstance(t, ast.Name) and t.id == attribute for t in targets) and isinstance(
                        statement.value, ast.Constant):
                    constant = statement.value
                    lines = text.splitlines(keepends=True)
                    line = lines[constant.lineno - 1].encode("utf-8")
                    new = line[: constant.col_offset] + repr(value).encode("utf-8") + line[constant.end_col_offset :]
                    lines[constant.lineno - 1] = new.decode("utf-8")
                    return "".join(lines)
    raise ExportError(f"class {class_name} has no constant `{attribute} = ...` to set; hfx.export needs updating")


def _locate(module: str, why: str) -> SourceModule:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise ExportError(f"module {module} ({why}) cannot be found: {exc}") from None
    if spec is None:
        raise ExportError(f"module {module} ({why}) is not installed")
    origin = spec.origin
    if origin is None or origin in ("built-in", "frozen"):
        raise ExportError(f"module {module} ({why}) has no source file (a namespace package or built into Python); "
                          "an export copies plain .py files only")
    if not origin.endswith(".py"):
        raise ExportError(f"module {module} ({why}) is a compiled extension ({Path(origin).name}); an export copies "
                          "plain .py source files only")
    return SourceModule(name=module, path=Path(origin), flat=flat_name(module),
                        is_package=spec.submodule_search_locations is not None)


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None


def _init_binds(package: str, name: str) -> bool:
    """Whether the package's ``__init__`` binds ``name`` at its top level (then ``from package import name`` gets
    that object, not the submodule of the same name: hfx's ``registry`` is the instance, not the module)."""
    for node in _init_tree(package).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def _init_tree(package: str) -> ast.Module:
    """The package's parsed ``__init__`` (parsed once while the file is unchanged: every import of it asks)."""
    origin = importlib.util.find_spec(package).origin
    return _parsed(origin, os.stat(origin).st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _parsed(path: str, mtime_ns: int) -> ast.Module:
    return ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)


def _submodule_exists(package: str, name: str) -> bool:
    if not _is_package(package):
        return False
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except (ImportError, ValueError):
        return False


def _refuse_data_files(module: SourceModule, why: str) -> None:
    for node in ast.walk(module.tree):
        used = None
        if isinstance(node, ast.Name) and node.id in _DATA_FILE_NAMES:
            used = node.id
        elif isinstance(node, ast.Import):
            used = next((a.name for a in node.names if a.name in _DATA_FILE_MODULES), None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module in _DATA_FILE_MODULES or (node.module == "importlib"
                                                     and any(a.name == "resources" for a in node.names)):
                used = node.module
        if used:
            raise ExportError(f"module {module.name} ({why}) locates files next to its source ({used} at "
                              f"{module.path.name}:{node.lineno}): a package with data files cannot be carried by "
                              "an export, which copies .py files only")


def _insert_self_reference(text: str) -> str:
    """Bind ``_hfx_export_self`` (this module) right after the docstring and ``__future__`` imports, so a module
    that imports this one as a module object finds it even during a circular import."""
    tree = ast.parse(text)
    line = 0  # insert before this 0-based line
    for i, node in enumerate(tree.body):
        is_doc = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(
            node.value.value, str)
        if is_doc or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
            line = node.end_lineno
            continue
        break
    lines = text.splitlines(keepends=True)
    binding = (f"import sys as _hfx_export_sys\n{SELF_NAME} = _hfx_export_sys.modules[__name__]  "
               "# `from .this import _hfx_export_self as name` stands for `from . import this as name`\n"
               "del _hfx_export_sys\n")
    return "".join(lines[:line]) + binding + "".join(lines[line:])


# --------------------------------------------------------------------------------------------------
# The static registry and the attention registration that replace entry points in an export


def _check_defines(module: SourceModule, names: dict[str, str]) -> None:
    """Refuse clearly if hfx's own code no longer has what an export's generated code relies on."""
    defined = set()
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            defined.add(node.name)
            if isinstance(node, ast.ClassDef):
                defined.update(f"{node.name}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef))
        elif isinstance(node, ast.Assign):
            defined.update(t.id for t in node.targets if isinstance(t, ast.Name))
    missing = [name for name in names if name not in defined]
    if missing:
        raise ExportError(f"{module.name} no longer defines {missing}, which an export's generated code uses "
                          f"({'; '.join(names[m] for m in missing)}); hfx.export needs updating")


def static_registry_source(components: list[ExportedComponent]) -> str:
    """Appended to the exported registry module: ``registry`` lists exactly these components, each imported from
    its module in this folder on first use (the ``from .x import`` lines also tell transformers to copy them)."""
    loaders, table = [], {}
    for c in components:
        function = f"_hfx_export_load_{c.kind}_{c.name}".replace("-", "_").replace(".", "_")
        first, *rest = c.attribute.split(".")
        loaders.append(f"def {function}():\n    from .{c.flat_module} import {first} as found\n"
                       f"    return found{''.join('.' + r for r in rest)}\n")
        table.setdefault(c.kind, {})[c.name] = (c.entry_point, function)
    rows = ",\n".join(
        f"    {kind!r}: {{" + ", ".join(f"{name!r}: ({target!r}, {function})" for name, (target, function) in entries.items())
        + "}"
        for kind, entries in table.items()
    )
    return (
        "\n\n# ---- hfx export: a static registry ---------------------------------------------------------------\n"
        "# This folder has no entry points: the components its model uses are listed here.\n\n\n"
        + "\n\n".join(loaders)
        + "\n\n_HFX_EXPORT_COMPONENTS = {\n" + rows + ("\n" if rows else "") + "}\n\n\n"
        "class _ExportedEntryPoint:\n"
        "    \"\"\"Stands in for an importlib.metadata entry point: a name, its original target, and a loader.\"\"\"\n\n"
        "    def __init__(self, name, value, loader):\n"
        "        self.name, self.value, self._loader = name, value, loader\n\n"
        "    def load(self):\n"
        "        return self._loader()\n\n\n"
        "class ExportedPluginRegistry(PluginRegistry):\n"
        "    \"\"\"The registry of an exported model: the components above instead of installed entry points.\"\"\"\n\n"
        "    def _entry_points(self, kind):\n"
        "        self._check_kind(kind)\n"
        "        found = _HFX_EXPORT_COMPONENTS.get(kind, {})\n"
        "        return {name: _ExportedEntryPoint(name, target, loader) for name, (target, loader) in found.items()}\n\n\n"
        "registry = ExportedPluginRegistry()\n"
    )


ATTENTION_REGISTRATION = (
    "\n\n# ---- hfx export: this folder's attention backends, registered with transformers' AttentionInterface ----\n"
    "from .attention import register_attention_plugins as _hfx_export_register_attention  # noqa: E402\n\n"
    "_hfx_export_register_attention()\n"
)


# --------------------------------------------------------------------------------------------------
# The export itself


@dataclass
class ExportedComponent:
    kind: str
    name: str
    entry_point: str  # "module:attribute" as installed
    module: str
    attribute: str
    distribution: str
    version: str
    flat_module: str = ""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    out_dir: Path
    architecture: str
    auto_map: dict[str, str]
    components: list[ExportedComponent]
    modules: dict[str, str]  # export file -> original module
    files: list[str]
    num_parameters: int
    requirements: list[str] = field(default_factory=list)


def check_output(out_dir: Path, overwrite: bool) -> list[str]:
    """Entries an overwrite replaces (empty for a new or empty folder); anything else is refused, naming it
    (:func:`hfx.safe_paths.check_replaceable_output` with :data:`OUTPUT`'s wording)."""
    return check_replaceable_output(out_dir, overwrite, OUTPUT)


def read_model_config(model_dir: Path) -> dict:
    """``MODEL_DIR/config.json`` of an hfx model (read as JSON: refused before torch is imported)."""
    if not model_dir.is_dir():
        raise ExportError(f"MODEL_DIR {model_dir} is not a folder; give the folder a model was saved to "
                          "(save_pretrained).")
    path = model_dir / "config.json"
    if not path.is_file():
        hint = " It holds a PEFT adapter: merge it first (hfx finetune --merge)." if (
            model_dir / "adapter_config.json").is_file() else ""
        raise ExportError(f"MODEL_DIR {model_dir} has no config.json, so it is not a saved hfx model.{hint}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("model_type") != "hfx":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ExportError(f"{path} has model_type={found!r}; hfx export exports hfx models (model_type='hfx') only.")
    if config.get("auto_map"):
        raise ExportError(f"{path} already has an auto_map {config['auto_map']}: it is an export (or remote code) "
                          "itself; export the original hfx model folder instead.")
    if config.get("quantization_config"):
        raise ExportError(f"{path} holds a quantized model ({config['quantization_config'].get('quant_method')}); "
                          "export the unquantized model (quantize when loading the export).")
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise ExportError(f"{path} names architectures={architectures!r}; an export needs exactly one hfx model class "
                          "(save the model with save_pretrained).")
    return config


def export_model(model_dir, out_dir, *, overwrite: bool = False) -> ExportResult:
    """Write ``out_dir``: ``model_dir``'s model with the code it needs, loadable without hfx.

    Refused before any model is loaded: a ``model_dir`` without an hfx ``config.json``, a non-empty
    ``out_dir`` that is not an earlier export (or is one, without ``overwrite``). Refused before anything is
    written: a component registered only in this process, or whose source is not a plain ``.py`` module.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    raw = read_model_config(model_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise ExportError(f"OUT_DIR is MODEL_DIR ({model_dir}); export to another folder.")
    check_output(out_dir, overwrite)

    import torch

    import hfx  # noqa: F401  (registers the model type)
    from .auto_registration import CLASS_MODULES, MODEL_CLASSES, MODELING_MODULE
    from .registry import registry

    architecture = raw["architectures"][0]
    auto_for = {cls: auto for auto, cls in MODEL_CLASSES.items()}
    if architecture not in auto_for:
        raise ExportError(f"config.json names architecture {architecture!r}, not an hfx model class; hfx classes: "
                          f"{sorted(auto_for)}.")

    def module_of(class_name: str) -> str:
        return CLASS_MODULES.get(class_name, MODELING_MODULE)

    model_class = getattr(importlib.import_module(module_of(architecture)), architecture)
    used: list[tuple[str, str]] = []
    with _recording(registry, used):
        model = model_class.from_pretrained(model_dir, dtype="auto")
    model.eval()
    config = model.config
    for kind, field_name in (("norm", "norm_type"), ("position", "position_embedding_type"), ("ffn", "ffn_type"),
                             ("attention", "attention_type")):
        value = getattr(config, field_name, None)
        if isinstance(value, str) and value in registry.names(kind):
            used.append((kind, value))
    components = _components(registry, sorted(set(used)))

    # The model classes offered through auto_map, and the modules they live in.
    classes = {auto_for[architecture]: architecture}
    if not getattr(config, "is_encoder_decoder", False):
        classes.setdefault("AutoModel", MODEL_CLASSES["AutoModel"])
        for auto in SHARED_BASE_HEADS:
            classes.setdefault(auto, MODEL_CLASSES[auto])
    config_module = type(config).__module__
    internal = {CORE_PACKAGE} | _plugin_packages(registry) | {c.module.split(".")[0] for c in components}
    modules = ModuleSet(internal)
    for cls in classes.values():
        modules.add(module_of(cls), f"defines {cls}")
    modules.add(config_module, f"defines {type(config).__name__}")
    registry_module = modules.add("hfx.registry", "the component registry")
    _check_defines(registry_module, {
        "PluginRegistry": "the static registry subclasses it",
        "PluginRegistry._entry_points": "the static registry overrides it",
        "PluginRegistry._check_kind": "the static registry calls it",
        "registry": "the module-level registry is replaced",
    })
    for c in components:
        c.flat_module = modules.add(c.module, f"plugin of {c.kind} {c.name!r}").flat
    uses_attention_plugin = any(c.kind == "attention" for c in components)
    if uses_attention_plugin:
        _check_defines(modules.add("hfx.attention", "registers attention plugins"),
                       {"register_attention_plugins": "the export registers its attention backends with it"})
    auto_map = {"AutoConfig": f"{flat_name(config_module)}.{type(config).__name__}"}
    auto_map.update({auto: f"{flat_name(module_of(cls))}.{cls}" for auto, cls in sorted(classes.items())})

    num_parameters = sum(p.numel() for p in model.parameters())
    out_dir.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.absolute().parent))
    try:
        with torch.no_grad():
            model.save_pretrained(tmp)
        config_path = tmp / "config.json"
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        saved["auto_map"] = auto_map
        saved["model_type"] = EXPORT_MODEL_TYPE
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written_modules = {}
        for module in modules.modules.values():
            text = modules.rewritten(module)
            if module.name == "hfx.registry":
                text += static_registry_source(components)
            if module.name == config_module:
                text = set_class_constant(text, type(config).__name__, "model_type", EXPORT_MODEL_TYPE)
                if uses_attention_plugin:
                    text += ATTENTION_REGISTRATION
            compile(text, module.flat + ".py", "exec")  # a rewrite that broke the syntax must not be shipped
            (tmp / f"{module.flat}.py").write_text(text, encoding="utf-8")
            written_modules[f"{module.flat}.py"] = module.name
        copied = _copy_tokenizer_files(model_dir, tmp)
        requirements = sorted(r for r in modules.requirements if r not in sys.stdlib_module_names)
        result = ExportResult(
            out_dir=out_dir, architecture=architecture, auto_map=auto_map, components=components,
            modules=written_modules, files=[], num_parameters=num_parameters, requirements=requirements,
        )
        from . import __version__

        (tmp / "README.md").write_text(model_card(model, result, model_dir, copied, __version__), encoding="utf-8")
        result.files = sorted(entry.name for entry in tmp.iterdir()) + [MANIFEST_FILE]
        manifest = {
            "hfx_version": __version__,
            "source": model_dir.resolve().name,  # the folder's name only: an export may be shared
            "architecture": architecture,
            "auto_map": auto_map,
            "components": [{k: v for k, v in vars(c).items()} for c in components],
            "modules": written_modules,
            "requirements": requirements,
            "num_parameters": num_parameters,
            "files": sorted(result.files),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        # again: files may have been put there meanwhile
        replaced = check_output(out_dir, overwrite)
        swap_folder_in(tmp, out_dir, replaced, OUTPUT)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.files = sorted(result.files)
    return result


class _recording:
    """Record every ``registry.get(kind, name)`` while the model is built (components its code asks for)."""

    def __init__(self, registry, used: list):
        self.registry, self.used = registry, used

    def __enter__(self):
        original = type(self.registry).get

        def get(kind, name):
            self.used.append((kind, name))
            return original(self.registry, kind, name)

        self.registry.get = get
        return self

    def __exit__(self, *exc):
        del self.registry.get
        return False


def _plugin_packages(registry) -> set[str]:
    """Top-level packages of every installed hfx entry point: a plugin importing another plugin's package
    gets that code copied too, never left as an import of something the export's user may not have."""
    from .registry import KINDS

    packages = set()
    for kind in KINDS:
        for ep in registry._entry_points(kind).values():
            packages.add(ep.value.split(":")[0].split(".")[0])
    return packages


def _components(registry, used: list[tuple[str, str]]) -> list[ExportedComponent]:
    """Where each used component's code is; refuses one whose source an export cannot carry."""
    out = []
    for kind, name in used:
        if kind == "tasks":
            continue
        if (kind, name) in registry._local:
            raise ExportError(f"{kind} component {name!r} is registered only in this process (registry.register); an "
                              "export copies installed plugins. Install it as a package with an entry point in the "
                              f"hfx.{kind} group, then export again.")
        ep = registry._entry_points(kind).get(name)
        if ep is None:
            raise ExportError(f"{kind} component {name!r} has no installed entry point (group hfx.{kind}).")
        module, _, attribute = ep.value.partition(":")
        if not attribute:
            raise ExportError(f"{kind} component {name!r}: entry point {ep.value!r} names a module, not its Component "
                              "object; an export needs `module:attribute`.")
        dist = getattr(ep, "dist", None)
        out.append(ExportedComponent(
            kind=kind, name=name, entry_point=ep.value, module=module, attribute=attribute,
            distribution=dist.metadata["Name"] if dist is not None else "?",
            version=dist.version if dist is not None else "?",
        ))
    return out


def _copy_tokenizer_files(model_dir: Path, tmp: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for path in sorted(model_dir.glob(pattern)):
            if path.is_file() and not (tmp / path.name).exists():
                shutil.copyfile(path, tmp / path.name)
                copied.append(path.name)
    return copied


# --------------------------------------------------------------------------------------------------
# The model card


def _training_files(model_dir: Path) -> dict[str, Path]:
    """hfx run files describing how the model was made: in the model folder or the run folder above it."""
    found = {}
    for name in TRAINING_FILES:
        for folder in (model_dir, model_dir.parent):
            if (folder / name).is_file():
                found[name] = folder / name
                break
    return found


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`" if text != "" else "`\"\"`"


def _training_section(model_dir: Path) -> list[str]:
    files = _training_files(model_dir)
    if not files:
        return ["Not recorded: the model folder (and the folder above it) holds no hfx run files "
                "(`hfx_finetune.json`, `pretrain_args.json`, `trainer_state.json`)."]
    lines = []
    for name, path in files.items():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            lines += [f"- `{name}`: unreadable", ""]
            continue
        if name == "trainer_state.json" and isinstance(data, dict):
            losses = [entry["loss"] for entry in data.get("log_history", []) if "loss" in entry]
            data = {"global_step": data.get("global_step"), "epoch": data.get("epoch"),
                    "train_batch_size": data.get("train_batch_size"), "last_logged_loss": losses[-1] if losses else None}
        lines += [f"From `{name}`:", "", "| setting | value |", "|---|---|"]
        items = data.items() if isinstance(data, dict) else [("value", data)]
        lines += [f"| `{key}` | {_cell(value)} |" for key, value in items]
        lines.append("")
    return lines


def model_card(model, result: ExportResult, model_dir: Path, tokenizer_files: list[str], hfx_version: str) -> str:
    import torch
    import transformers

    config = model.config
    name = model_dir.resolve().name
    defaults = type(config)().to_dict()
    values = config.to_dict()
    skip = {"architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}
    auto = next(a for a, target in result.auto_map.items() if target.endswith("." + result.architecture))
    rows = []
    for key in sorted(k for k in values if k not in skip):
        changed = key in defaults and defaults[key] != values[key]
        rows.append(f"| `{key}` | {_cell(values[key])} |" + (" set |" if changed else " |"))
    components = [f"| {c.kind} | `{c.name}` | `{c.flat_module}.py` | {c.distribution} {c.version} (`{c.entry_point}`) |"
                  for c in result.components] or ["| - | none: only hfx's core code | | |"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [
        f"# {name}", "",
        f"An hfx model (`{result.architecture}`), exported with `hfx export` (hfx {hfx_version}). The folder holds its "
        "code: it loads with transformers alone, hfx need not be installed.", "",
        "```python",
        f"from transformers import {auto}",
        f"model = {auto}.from_pretrained(\"path/to/{name}\", trust_remote_code=True)",
        "```", "",
        f"`model_type` is `{EXPORT_MODEL_TYPE}`, so this folder always runs its own code (also where hfx is "
        "installed) and always needs `trust_remote_code=True`.", "",
        "## Architecture", "",
        "| | |", "|---|---|",
        f"| class | `{result.architecture}` ({', '.join(f'`{a}`' for a in result.auto_map if a != 'AutoConfig')}) |",
        f"| layers | {config.num_hidden_layers}" + (f" encoder + {getattr(config, 'decoder_layers', None)} decoder"
                                                   if getattr(config, "is_encoder_decoder", False) else "") + " |",
        f"| hidden size / heads / key-value heads | {config.hidden_size} / {config.num_attention_heads} / "
        f"{config.num_key_value_heads} |",
        f"| norm | `{config.norm_type}`, `{config.norm_position}`-norm |",
        f"| positions | `{config.position_embedding_type}` |",
        f"| feed-forward | `{config.ffn_type}` (intermediate size {config.intermediate_size}) |",
        f"| attention | `{config.attention_type}` |",
        f"| vocabulary | {config.vocab_size} |",
        f"| parameters | {result.num_parameters:,} ({trainable:,} trainable) |",
        f"| weights | `model.safetensors`, {next(model.parameters()).dtype} |", "",
        "## Components", "",
        "| kind | name | file here | from |", "|---|---|---|---|", *components, "",
        "## Every setting", "",
        "`config.json` as saved (\"set\": differs from HfxConfig's default).", "",
        "| field | value | |", "|---|---|---|", *rows, "",
        "## Training", "", *_training_section(model_dir), "",
        "## Files", "",
        f"- code: {', '.join(f'`{f}`' for f in sorted(result.modules))} (from "
        f"{', '.join(sorted(set(result.modules.values())))}; imports rewritten to this folder)",
        f"- tokenizer: {', '.join(f'`{f}`' for f in tokenizer_files) if tokenizer_files else 'none in the model folder'}",
        f"- `{MANIFEST_FILE}`: what was exported from where", "",
        "## Requirements", "",
        f"Exported with torch {torch.__version__} and transformers {transformers.__version__}; the code imports "
        f"{', '.join(f'`{r}`' for r in result.requirements)}.", "",
    ]
    return "\n".join(lines)


__all__ = ["EXPORT_MODEL_TYPE", "ExportError", "ExportResult", "MANIFEST_FILE", "ModuleSet", "export_model", "flat_name",
           "static_registry_source"]
