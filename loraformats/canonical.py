"""The canonical intermediate form every reader produces and every writer consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .adapters import Adapter
from .families import Component, Family, Layer
from .tensors import SourceFile

#: Module addresses are (component name, canonical module path).
ModuleKey = tuple[str, str]


@dataclass
class Provenance:
    """Where an adapter set came from, and what a writer needs to reproduce the source."""

    format: str
    path: str
    namings: dict[str, str] = field(default_factory=dict)  # component -> naming of flattened names
    spellings: dict[str, str] = field(default_factory=dict)  # component -> naming of dotted names
    steps: list[Any] = field(default_factory=list)  # `Step`s a reader took beyond renaming (e.g. an unfold)
    notes: dict[str, Any] = field(default_factory=dict)  # format-specific round-trip facts


@dataclass
class AdapterSet:
    """A LoRA in canonical form: a family, an adapter per module, and the source's metadata."""

    family: Family
    modules: dict[ModuleKey, Adapter]
    metadata: dict[str, str]
    provenance: Provenance
    sources: list[SourceFile] = field(default_factory=list, repr=False)

    def layer(self, key: ModuleKey) -> Layer:
        return self.family.components[key[0]].modules[key[1]]

    def component(self, name: str) -> Component:
        return self.family.components[name]

    def components_used(self) -> list[str]:
        seen = dict.fromkeys(component for component, _ in self.modules)
        return [name for name in self.family.components if name in seen]

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def __enter__(self) -> AdapterSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
