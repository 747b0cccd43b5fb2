"""The plugin manager and the registry of formats, families and transforms it fills.

Plugins come from the entry-point group `loraformats` (built-ins included) and load lazily,
on first use. Embedding apps can restrict them with environment variables:

- `LORAFORMATS_LOAD_PLUGINS=name1,name2` loads only those entry points ("" loads none);
- `LORAFORMATS_BLOCK_PLUGINS=name1,name2` skips those.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pluggy

from . import hookspecs
from .entrypoints import entry_points
from .errors import UsageError

ENTRY_POINT_GROUP = "loraformats"

#: Core modules that are themselves plugins (pytest-style dogfooding).
DEFAULT_PLUGINS = ("loraformats.transforms",)

T = TypeVar("T")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str | None
    version: str | None


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


class Registry:
    """Owns the pluggy manager; collects what plugins register, once, on first use."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("loraformats")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._loaded = False
        self._cache: dict[str, dict[str, Any]] = {}

    def load(self) -> None:
        """Register default and entry-point plugins (idempotent)."""
        if self._loaded:
            return
        self._loaded = True
        for module_name in DEFAULT_PLUGINS:
            module = __import__(module_name, fromlist=["_"])
            self.pm.register(module, name=module_name)
            self.plugins[module_name] = PluginInfo(module_name, module_name, "loraformats", None)
        only, blocked = _names("LORAFORMATS_LOAD_PLUGINS"), _names("LORAFORMATS_BLOCK_PLUGINS") or set()
        for entry in entry_points(ENTRY_POINT_GROUP):
            if entry.name in blocked or (only is not None and entry.name not in only):
                continue
            if self.pm.has_plugin(entry.name):
                continue
            module = entry.load()
            self.pm.register(module, name=entry.name)
            self.plugins[entry.name] = PluginInfo(entry.name, entry.value, entry.distribution, entry.version)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object directly (tests, embedding apps). Clears cached registrations."""
        self.load()
        label = self.pm.register(plugin, name=name) or repr(plugin)
        self.plugins[label] = PluginInfo(
            label, getattr(plugin, "__name__", type(plugin).__name__), None, None
        )
        self._cache.clear()

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)
        self._cache.clear()

    def _collect(self, hook: str) -> dict[str, Any]:
        if hook not in self._cache:
            self.load()
            found: dict[str, Any] = {}
            owners: dict[str, str] = {}

            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                owner = impl.plugin_name

                def register(item: Any, _owner: str = owner) -> None:
                    name = getattr(item, "name", None)
                    if not isinstance(name, str) or not name:
                        raise TypeError(f"plugin {_owner!r} registered {item!r} without a name")
                    if name in found:
                        raise UsageError(
                            f"{hook}: {name!r} is registered by both {owners[name]!r} and {_owner!r}"
                        )
                    found[name], owners[name] = item, _owner
                    item.plugin = _owner

                impl.function(register=register)
            self._cache[hook] = found
        return self._cache[hook]

    def formats(self) -> dict[str, Any]:
        return self._collect("register_formats")

    def families(self) -> dict[str, Any]:
        return self._collect("register_families")

    def transforms(self) -> dict[str, Any]:
        return self._collect("register_transforms")

    def get(self, kind: Callable[[], dict[str, T]], name: str, what: str) -> T:
        items = kind()
        if name not in items:
            known = ", ".join(sorted(items)) or "none installed"
            raise UsageError(f"unknown {what} {name!r} (known: {known})")
        return items[name]


registry = Registry()
