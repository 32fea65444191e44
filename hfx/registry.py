"""Plugin registry: every component kind is found through Python entry points.

A component is declared by an installed distribution under the entry-point group
``hfx.<kind>``; the entry point resolves to a :class:`Component`. First-party components in
``plugins/`` use exactly this door, so a third-party package is indistinguishable from them.

Discovery is lazy: listing names reads package metadata only; a plugin module is imported the
first time its component is asked for. A plugin that fails to import is reported with its
name and error and never breaks the others.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

KINDS = ("attention", "norm", "position", "ffn", "tasks")


@dataclass(frozen=True)
class Component:
    """What a plugin provides: one named building block of a given kind.

    ``factory`` builds the block. Its contract depends on the kind:

    - ``norm``: ``factory(config, hidden_size) -> nn.Module`` whose forward is
      ``forward(hidden_states, padding_mask=None)`` (``padding_mask``: bool (batch, seq), True on real tokens).
    - ``position``: ``factory(config) -> nn.Module`` whose forward is
      ``forward(inputs_embeds, position_ids) -> (inputs_embeds, rotary)``; ``rotary`` is ``None`` or the
      ``(cos, sin)`` pair that the attention layer applies to queries and keys.
    - ``ffn``: ``factory(config) -> nn.Module`` (or ``factory(config, layer_idx)``, to vary by block) mapping
      ``(batch, seq, hidden)`` to the same shape.
    - ``attention``: ``factory`` is the function registered in transformers' ``AttentionInterface``
      (``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``) and
      ``mask_factory`` the matching ``AttentionMaskInterface`` function.
    - ``tasks``: ``factory()`` returns a list of evaluation tasks: lm-eval-format task mappings (dicts),
      ``hfx.evaluation.TaskConfig`` objects, or paths to task YAML files / directories.

    ``config_defaults`` lists the config fields the component reads, with their defaults, so that
    ``HfxConfig`` can document and fill them; ``validate_config(config)`` raises ``ValueError`` for
    values the component cannot work with, at config construction.

    ``supports_kv_cache`` (attention only) is False for a backend that cannot decode from a KV cache (it needs
    every key of the sequence at each call, e.g. ``hfx_lsh``, ``hfx_block_sparse``): hfx causal LMs using it
    generate with ``use_cache=False`` by default (each new token runs a full forward).

    ``attach(module, config)`` (attention only) is called by each hfx attention layer built with this backend,
    so a backend that learns something per layer (adaptive span's per-head span) can register its parameters
    on that layer (they are then saved, loaded, trained and counted like the projections). A backend with
    ``attach`` needs those parameters: used on a stock transformers model it must refuse clearly.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    description: str = ""
    config_defaults: Mapping[str, Any] = field(default_factory=dict)
    validate_config: Callable[[Any], None] | None = None
    mask_factory: Callable[..., Any] | None = None
    supports_kv_cache: bool = True
    attach: Callable[[Any, Any], None] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Component kind {self.kind!r} is not one of {list(KINDS)}.")


class PluginLoadError(ImportError):
    """A plugin is installed but its entry point could not be loaded."""


@dataclass(frozen=True)
class PluginInfo:
    """One row of ``hfx plugins``: what is installed, by whom, and whether it loads."""

    kind: str
    name: str
    target: str
    distribution: str
    version: str
    error: str | None = None


class PluginRegistry:
    """Finds components through entry points and caches what it has loaded."""

    def __init__(self):
        self._loaded: dict[tuple[str, str], Component] = {}
        self._local: dict[tuple[str, str], Component] = {}
        self._scanned: dict[tuple[str, tuple[str, ...]], dict[str, EntryPoint]] = {}

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"Unknown component kind {kind!r}; valid kinds are {list(KINDS)}.")

    def _entry_points(self, kind: str) -> dict[str, EntryPoint]:
        """Read once per ``sys.path`` (scanning every installed distribution costs milliseconds, and models ask
        per layer); a new folder on ``sys.path`` is seen at once, a plugin installed into a running process after
        :meth:`refresh`."""
        self._check_kind(kind)
        key = (kind, tuple(sys.path))
        found = self._scanned.get(key)
        if found is None:
            found = {}
            for ep in entry_points(group=f"hfx.{kind}"):
                found.setdefault(ep.name, ep)
            self._scanned[key] = found
        return found

    def refresh(self) -> None:
        """Forget the entry points read so far (after ``pip install`` of a plugin into this running process)."""
        self._scanned.clear()

    def names(self, kind: str) -> list[str]:
        """Installed component names of a kind (metadata only, nothing is imported)."""
        return sorted(set(self._entry_points(kind)) | {n for k, n in self._local if k == kind})

    def register(self, component: Component) -> Component:
        """Register a component in this process only (notebooks, tests); installed ones use entry points."""
        self._local[(component.kind, component.name)] = component
        self._loaded.pop((component.kind, component.name), None)
        return component

    def unregister(self, kind: str, name: str) -> None:
        self._local.pop((kind, name), None)
        self._loaded.pop((kind, name), None)

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``, importing its plugin on first use."""
        key = (kind, name)
        if key in self._local:
            return self._local[key]
        if key in self._loaded:
            return self._loaded[key]
        eps = self._entry_points(kind)
        if name not in eps:
            raise ValueError(unknown_name_message(kind, name, self.names(kind)))
        component = self._load(eps[name], kind)
        self._loaded[key] = component
        return component

    @staticmethod
    def _load(ep: EntryPoint, kind: str) -> Component:
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must name itself, not take the others down
            raise PluginLoadError(
                f"hfx plugin {ep.name!r} (group hfx.{kind}, {ep.value}) failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        if callable(obj) and not isinstance(obj, Component):
            obj = obj()
        if not isinstance(obj, Component) or obj.kind != kind or obj.name != ep.name:
            raise PluginLoadError(
                f"hfx plugin {ep.name!r} (group hfx.{kind}, {ep.value}) must resolve to "
                f"Component(kind={kind!r}, name={ep.name!r}), got {obj!r}"
            )
        return obj

    def describe(self) -> list[PluginInfo]:
        """Every installed component with its distribution, version and load status."""
        rows = []
        for kind in KINDS:
            for name, ep in sorted(self._entry_points(kind).items()):
                dist = getattr(ep, "dist", None)
                error = None
                try:
                    self.get(kind, name)
                except PluginLoadError as exc:
                    error = str(exc)
                rows.append(
                    PluginInfo(
                        kind=kind,
                        name=name,
                        target=ep.value,
                        distribution=dist.metadata["Name"] if dist is not None else "?",
                        version=dist.version if dist is not None else "?",
                        error=error,
                    )
                )
            for (k, name), comp in sorted(self._local.items()):
                if k == kind:
                    rows.append(PluginInfo(kind, name, repr(comp.factory), "(registered in process)", "-"))
        return rows


def check_component_name(kind: str, field_name: str, value) -> None:
    """Raise ValueError naming ``field_name``, ``value`` and the installed names unless ``value`` is one.

    Reads entry-point metadata only, so a CLI can check a name before importing torch.
    """
    names = registry.names(kind)
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"{field_name}={value!r} is invalid: {unknown_name_message(kind, value, names)}")


def unknown_name_message(kind: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), valid, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return f"Unknown {kind} {name!r}. Installed {kind} components: {valid}.{hint}"


registry = PluginRegistry()
