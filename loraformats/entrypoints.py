"""One entry-point group, read straight from the installed distributions' metadata directories.

`importlib.metadata` imports about twenty modules (email, zipfile, csv ...) and parses every
distribution's METADATA to list entry points: some 20 ms of a conversion's start-up. A group's
entry points are the `[group]` section of `entry_points.txt` in each `*.dist-info` or `*.egg-info`
directory on `sys.path` (what pip, uv, conda and editable installs write); this reads only those
files, with importlib.metadata's precedence: the first distribution of a name on the path wins.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

_METADATA_DIRS = (".dist-info", ".egg-info")


@dataclass(frozen=True)
class EntryPoint:
    name: str
    value: str  # "module" or "module:attribute"
    distribution: str | None
    version: str | None

    def load(self) -> Any:
        """Import the module and follow the attribute path, as `importlib.metadata` does."""
        module, _, attribute = self.value.partition("[")[0].partition(":")
        loaded = importlib.import_module(module.strip())
        for part in filter(None, attribute.strip().split(".")):
            loaded = getattr(loaded, part)
        return loaded


def entry_points(group: str, path: Sequence[str] | None = None) -> list[EntryPoint]:
    """The entry points of `group` of every distribution installed on `path` (default `sys.path`)."""
    found = []
    for directory in _distributions(sys.path if path is None else path):
        text = _read(directory, "entry_points.txt")
        if text is not None and f"[{group}]" in text:
            distribution, version = _name_and_version(directory)
            found += [EntryPoint(name, value, distribution, version) for name, value in _section(text, group)]
    return found


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as file:
            return file.read()
    except (OSError, UnicodeDecodeError):
        return None


def _name_and_version(directory: str) -> tuple[str | None, str | None]:
    """`Name` and `Version` from the core metadata's headers (read only for a plugin's distribution)."""
    text = _read(directory, "METADATA" if directory.endswith(".dist-info") else "PKG-INFO") or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the body (long description) follows the first blank line
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields.get("name"), fields.get("version")


def _distributions(path: Sequence[str]) -> Iterator[str]:
    """The metadata directory of each distribution on `path`, the first of a normalised name only."""
    seen: set[str] = set()
    for entry in path:
        try:
            children = os.listdir(entry or ".")
        except OSError:  # missing, a zip file, not a directory
            continue
        for child in children:
            stem, dot, kind = child.rpartition(".")
            if not dot or f".{kind.lower()}" not in _METADATA_DIRS:
                continue
            key = re.sub(r"[-_.]+", "_", stem.partition("-")[0]).lower()
            if key not in seen:
                seen.add(key)
                yield os.path.join(entry or ".", child)


def _section(text: str, group: str) -> Iterator[tuple[str, str]]:
    """`name = value` pairs of one INI section; blank lines and `#`/`;` comments skipped."""
    inside = False
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            inside = line[1:-1].strip() == group
        elif inside and "=" in line:
            name, _, value = line.partition("=")
            yield name.strip(), value.strip()
