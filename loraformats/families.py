"""Model families: which modules a LoRA can target, under which names.

A family is data (a module table per component, plus alternative namings) produced by a
generator from the real model classes and frozen under `specs/`. Formats never hard-code
family knowledge; they ask a family to resolve the names they find.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

CANONICAL = "canonical"


@dataclass(frozen=True)
class Layer:
    """The base layer a module adapter changes: its kind and weight geometry."""

    kind: str  # "linear", "conv2d" or "norm"
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "conv2d":
            return (self.out_features, self.in_features, *self.kernel)
        if self.kind == "norm":
            return (self.out_features,)
        return (self.out_features, self.in_features)

    @classmethod
    def from_spec(cls, entry: list) -> Layer:
        """The layer of a spec entry; equal layers are one shared object, so hot paths can key on `id`.
        A family's spec lists thousands of entries with a few dozen geometries: most are looked up."""
        kind, fan_in, fan_out, *rest = entry
        kernel = tuple(rest[0]) if rest else (1, 1)
        found = _SPEC_LAYERS.get((kind, fan_in, fan_out, kernel))
        if found is None:
            layer = cls(kind, fan_in, fan_out, kernel)
            found = _SPEC_LAYERS[kind, fan_in, fan_out, kernel] = _LAYERS.setdefault(layer, layer)
        return found

    def to_spec(self) -> list:
        entry: list = [self.kind, self.in_features, self.out_features]
        return [*entry, list(self.kernel)] if self.kind == "conv2d" else entry


#: Every distinct layer geometry (a few hundred at most), and the same by a spec entry's fields.
_LAYERS: dict[Layer, Layer] = {}
_SPEC_LAYERS: dict[tuple[str, int, int, tuple], Layer] = {}


def block_of(path: str) -> str:
    """The block a module path belongs to: the path up to its first index (`down_blocks.1`,
    `text_model.encoder.layers.3`, `mid_block.attentions.0`), else its first segment (`conv_in`).
    Generic on purpose: every family numbers its repeated blocks."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


#: Component, block, layer kind and naming of a module ("" where namings spell its name alike).
Place = tuple[str, str, str, str]


class _Places(dict):
    """`Component.places`, each entry made on first lookup (a family's tables are large, a file
    adapts few of its modules)."""

    def __init__(self, component: Component) -> None:
        super().__init__()
        self.component = component
        self.interned: dict[Place, Place] = {}

    def __missing__(self, key: tuple[str, str]) -> Place:
        component, (path, naming) = self.component, key
        shown = "" if component.spelled_alike(path, naming) else naming
        place = (component.name, block_of(path), component.modules[path].kind, shown)
        place = self[key] = self.interned.setdefault(place, place)
        return place


@dataclass(frozen=True)
class ComponentHint:
    """What a key says about its component: a name (`unet.`), or a role and slot (`lora_te2_`)."""

    name: str | None = None
    role: str | None = None
    slot: int | None = None
    encoder: str | None = None  # what the encoder is (`clip_l`, `t5xxl`), as ComfyUI keys them


@dataclass
class Component:
    """One model of a pipeline (UNet, transformer, a text encoder) and the modules adapters may target.

    `modules` is keyed by canonical path (the diffusers/transformers module names) and also holds
    each fused group: a module some other naming has where the canonical model has several (BFL's
    `img_attn.qkv` for `to_q`, `to_k`, `to_v`), whose outputs are its members' outputs stacked in
    order. A naming names either a group or its members, never both. `row_orders` gives, per
    naming, modules whose output rows that naming orders differently (BFL's shift/scale halves),
    as the canonical row ranges in that naming's order.
    """

    name: str
    role: str  # "denoiser" or "text_encoder"
    slot: int | None
    modules: dict[str, Layer]
    namings: dict[str, dict[str, str]] = field(default_factory=dict)
    flat_naming: str = CANONICAL
    path_aliases: tuple[str, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    row_orders: dict[str, dict[str, tuple[tuple[int, int], ...]]] = field(default_factory=dict)
    #: The naming of the model's original checkpoints (LDM, BFL, MMDiT), which ComfyUI-style files use.
    native_naming: str = CANONICAL
    #: What the encoder is (`clip_l`, `clip_g`, `t5xxl`): how pipelines that key encoders by model name
    #: (ComfyUI's `text_encoders.clip_l.`) find it.
    encoder: str | None = None
    #: The numbers Kohya-style `lora_teN_` prefixes give this encoder; the first is written, all are read.
    slots: tuple[int, ...] = ()
    #: The class the table was read from (`T5EncoderModel`), for formats whose loaders support only some.
    model_class: str | None = None

    def name_in(self, path: str, naming: str) -> str:
        if naming == CANONICAL:
            if path in self.groups:
                raise KeyError(f"{path} is a fused group, which the canonical naming has no name for")
            return path
        return self.namings[naming][path]

    def nameable(self, path: str, naming: str) -> bool:
        """Whether `naming` has a name for the module or group at `path`."""
        if naming == CANONICAL:
            return path in self.modules and path not in self.groups
        return path in self.namings.get(naming, {})

    def naming_names(self) -> list[str]:
        return [CANONICAL, *self.namings]

    def named_paths(self, naming: str) -> list[str]:
        if naming == CANONICAL:
            return [path for path in self.modules if path not in self.groups]
        return list(self.namings[naming])

    @cached_property
    def groups_of(self) -> dict[str, tuple[str, ...]]:
        """Member path -> the fused groups it belongs to (XLabs' single-block `qkv` and BFL's
        `linear1` share `to_q`, `to_k`, `to_v`)."""
        found: dict[str, tuple[str, ...]] = {}
        for group, members in self.groups.items():
            for member in members:
                found[member] = (*found.get(member, ()), group)
        return found

    def is_alias(self, naming: str) -> bool:
        """Whether `naming` only respells the canonical one: every module, no groups, no row orders
        (transformers' runtime names of a text encoder are; LDM, BFL and XLabs namings are not)."""
        if naming == CANONICAL:
            return True
        table = self.namings.get(naming, {})
        return (
            naming != self.native_naming
            and naming not in self.row_orders
            and len(table) == len(self.modules) - len(self.groups)
            and not any(path in self.groups for path in table)
        )

    def spelled_alike(self, path: str, naming: str) -> bool:
        """Whether another naming spells this module's name the same way (SD3's `context_embedder`):
        such a name says nothing about which naming a file uses."""
        name = self.name_in(path, naming)
        return any(
            other != naming and self.nameable(path, other) and self.name_in(path, other) == name
            for other in self.naming_names()
        )

    @cached_property
    def blocks(self) -> dict[str, str]:
        """Module path -> the block it belongs to (`block_of`), in model order."""
        return {path: block_of(path) for path in self.modules}

    @cached_property
    def block_order(self) -> dict[str, int]:
        """Block -> its position in model order (of its first module)."""
        order: dict[str, int] = {}
        for block in self.blocks.values():
            order.setdefault(block, len(order))
        return order

    @cached_property
    def places(self) -> dict[tuple[str, str], Place]:
        """(path, naming) -> what a module's place says about it (component, block, layer kind, and
        the naming, "" where namings spell the name alike), filled as modules are looked up: one
        shared tuple per distinct answer, as detection counts modules by place."""
        return _Places(self)

    def row_order(self, path: str, naming: str) -> tuple[tuple[int, int], ...] | None:
        return self.row_orders.get(naming, {}).get(path)

    def _spellings(self) -> list[tuple[str, Iterable[tuple[str, str]]]]:
        """Per naming, in `naming_names` order: (path, name) of every module or group it names."""
        canonical = [(path, path) for path in self.modules if path not in self.groups]
        return [(CANONICAL, canonical), *((naming, table.items()) for naming, table in self.namings.items())]

    @cached_property
    def dotted_index(self) -> dict[str, tuple[str, str]]:
        """Dotted name in any naming (and under any path alias) -> (canonical path, naming); where
        namings spell a name alike, the first naming wins."""
        index: dict[str, tuple[str, str]] = {}
        for naming, spellings in reversed(self._spellings()):
            for path, name in spellings:
                index[name] = (path, naming)
                for alias in self.path_aliases:
                    if name.startswith(alias):
                        index.setdefault(name[len(alias) :], (path, naming))
        return index

    @cached_property
    def flat_index(self) -> dict[str, tuple[str, str]]:
        """Kohya-style flattened name in any naming -> (canonical path, naming); two modules that
        flatten alike would make Kohya names ambiguous, and are refused."""
        index: dict[str, tuple[str, str]] = {}
        for naming, spellings in self._spellings():
            for path, name in spellings:
                flat = name.replace(".", "_")
                previous = index.setdefault(flat, (path, naming))
                if previous[0] != path:
                    raise ValueError(
                        f"{self.name}: {previous[0]!r} and {path!r} flatten to the same {flat!r}"
                    )
        return index

    def resolve_dotted(self, name: str) -> tuple[str, str] | None:
        """(canonical path, naming) of a dotted module name in any of this component's namings."""
        return self.dotted_index.get(name)

    def resolve_flat(self, name: str) -> tuple[str, str] | None:
        """(canonical path, naming) of a Kohya-style flattened name; never guesses underscores."""
        found = self.flat_index.get(name)
        if found is None and name.endswith("_"):  # a known trainer quirk: a trailing separator
            found = self.flat_index.get(name.rstrip("_"))
        return found

    @classmethod
    def from_spec(cls, name: str, spec: Mapping[str, Any]) -> Component:
        tables = {path: Layer.from_spec(entry) for path, entry in spec["modules"].items()}
        groups = {group: tuple(members) for group, members in spec.get("groups", {}).items()}
        modules: dict[str, Layer] = {}
        firsts: dict[str, list[str]] = {}
        for group, members in groups.items():
            firsts.setdefault(members[0], []).append(group)
        for path, layer in tables.items():
            for group in firsts.get(path, ()):  # a group sits just before its first member, in model order
                modules[group] = fused_layer([tables[m] for m in groups[group]])
            modules[path] = layer
        return cls(
            name=name,
            role=spec["role"],
            slot=spec.get("slot"),
            modules=modules,
            namings={key: dict(table) for key, table in spec.get("namings", {}).items()},
            flat_naming=spec.get("flat_naming", CANONICAL),
            path_aliases=tuple(spec.get("path_aliases", ())),
            groups=groups,
            row_orders={
                naming: {path: tuple(tuple(r) for r in ranges) for path, ranges in table.items()}
                for naming, table in spec.get("row_orders", {}).items()
            },
            native_naming=spec.get("native_naming", spec.get("flat_naming", CANONICAL)),
            encoder=spec.get("encoder"),
            model_class=spec.get("class"),
            slots=tuple(spec.get("slots", [spec["slot"]] if spec.get("slot") is not None else [])),
        )


def fused_layer(members: list[Layer]) -> Layer:
    """The layer of a fused group: the members' shared input, their outputs stacked."""
    first = members[0]
    if any(
        (m.kind, m.in_features, m.kernel) != (first.kind, first.in_features, first.kernel) for m in members
    ):
        raise ValueError("the members of a fused group must share kind, inputs and kernel")
    layer = Layer(first.kind, first.in_features, sum(m.out_features for m in members), first.kernel)
    return _LAYERS.setdefault(layer, layer)


class Family:
    """A base-model family. Components load lazily, so registering a family costs nothing."""

    def __init__(
        self,
        name: str,
        label: str,
        components: Callable[[], dict[str, Component]] | dict[str, Component],
        *,
        description: str = "",
        spec_path: Path | None = None,
        aliases: tuple[str, ...] = (),
        releases: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.name, self.label, self.description, self.spec_path = name, label, description, spec_path
        #: Releases sharing this table (FLUX.1 dev, schnell, Kontext) -> the `component:path` modules
        #: each lacks. Detection lists the releases a file can be for; a header rarely tells them apart.
        self.releases = dict(releases or {})
        self._components = components
        #: Identifiers other tools use for this base model (sd-scripts' `sd_v1`, ModelSpec's
        #: `stable-diffusion-v1`): a detection signal from metadata, weaker than any tensor shape.
        self.aliases = tuple(alias.lower() for alias in aliases)

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    @cached_property
    def components(self) -> dict[str, Component]:
        loaded = self._components() if callable(self._components) else self._components
        return dict(loaded)

    def releases_for(self, modules: set[tuple[str, str]]) -> list[str]:
        """The releases that have every one of `modules` ((component, path) keys)."""
        keys = {f"{c}:{p}" for c, p in modules}
        return [name for name, lacks in self.releases.items() if not keys.intersection(lacks)]

    def claimed_by(self, identifier: str) -> bool:
        """Whether a base-model identifier from metadata names this family. A `/kind` suffix
        (ModelSpec's `stable-diffusion-v1/lora`) says what the file is, not which base it is for."""
        return identifier.strip().lower().split("/", 1)[0] in self.aliases

    def find_components(self, hint: ComponentHint) -> list[Component]:
        """Components a key prefix may refer to; `lora_te_` (no slot) means the first text encoder."""
        if hint.name is not None:
            found = self.components.get(hint.name)
            return [found] if found else []
        if hint.encoder is not None:
            return [c for c in self.components.values() if c.encoder == hint.encoder]
        if hint.role is None:
            return list(self.components.values())
        candidates = [c for c in self.components.values() if c.role == hint.role]
        if hint.slot is not None:
            return [c for c in candidates if hint.slot in c.slots]
        return sorted(candidates, key=lambda c: c.slot or 0)[:1]

    def text_encoders(self) -> list[Component]:
        return sorted(
            (c for c in self.components.values() if c.role == "text_encoder"), key=lambda c: c.slot or 0
        )

    @cached_property
    def _positions(self) -> dict[tuple[str, str], int]:
        return {(c.name, path): i for i, (c, path, _) in enumerate(self.iter_modules())}

    def in_model_order(self, modules: Mapping[tuple[str, str], Any]) -> dict[tuple[str, str], Any]:
        """`modules` keyed by (component, path), sorted as the model lists them (component order,
        then module table order; a fused group just before its first member)."""
        positions = self._positions
        return dict(sorted(modules.items(), key=lambda item: positions[item[0]]))

    def iter_modules(self) -> Iterator[tuple[Component, str, Layer]]:
        for component in self.components.values():
            for path, layer in component.modules.items():
                yield component, path, layer

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], **kw: Any) -> Family:
        """A family from an in-memory spec (same structure as a spec file): used for tiny test variants."""
        components = {key: Component.from_spec(key, c) for key, c in spec["components"].items()}
        return cls(spec["family"], spec.get("label", spec["family"]), components, **kw)

    @classmethod
    def from_spec_file(
        cls, name: str, label: str, path: Path | resources.abc.Traversable, **kw: Any
    ) -> Family:
        """A family whose tables live in a spec file written by `scripts/generate_family_specs.py`."""

        def load() -> dict[str, Component]:
            spec = json.loads(path.read_text())
            if spec.get("family") != name:
                raise ValueError(f"{path} describes {spec.get('family')!r}, not {name!r}")
            return {key: Component.from_spec(key, c) for key, c in spec["components"].items()}

        return cls(name, label, load, spec_path=path, **kw)


def builtin_spec(name: str) -> resources.abc.Traversable:
    """A spec file shipped in `specs/families/`."""
    return resources.files("loraformats.specs").joinpath("families", f"{name}.json")
