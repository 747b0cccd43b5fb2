"""From parsed keys to the canonical form: resolve names against families, check shapes, build adapters.

Shared by every reader and by detection, so that "which family, which module" has one answer.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import compress, groupby
from operator import attrgetter, itemgetter
from typing import NamedTuple

from .adapters import ALGORITHMS, Adapter, Exactness
from .canonical import AdapterSet, ModuleKey, Provenance
from .errors import InvalidFileError, UnsupportedError, UsageError
from .families import Component, ComponentHint, Family, Layer, Place
from .formats import Format, ParsedFile, ParsedModule, ReadContext
from .fusion import inverse, reorder_rows
from .header import Header
from .jsontext import parse_json
from .report import Step
from .tensors import FileTensor, SourceFile

#: Header entries loraformats itself writes; all live under this prefix.
NOTE_PREFIX = "loraformats."
STASH_KEY = "loraformats.stash"
NAMINGS_KEY = "loraformats.namings"  # the naming of the source's flattened (Kohya-style) names
SPELLINGS_KEY = "loraformats.spellings"  # the naming of the source's dotted names


class Match(NamedTuple):
    """A parsed module found in a family (a tuple: resolve makes one per module per family)."""

    module: ParsedModule
    component: Component
    path: str
    naming: str


@dataclass
class Resolution:
    """How one family explains a parsed file."""

    family: Family
    #: The matches in module order, as runs of modules found in one component: (modules, component,
    #: their (path, naming) hits). `matches` spells them out when asked; detection only counts them.
    runs: list[tuple[Sequence[ParsedModule], Component, list[tuple[str, str]]]] = field(default_factory=list)
    matched: int = 0
    unknown: list[str] = field(default_factory=list)
    misfit: list[str] = field(default_factory=list)
    #: module key -> the layer its name resolved to but its shapes did not fit (says which shapes decided).
    misfit_layers: dict[str, Layer] = field(default_factory=dict)
    #: Whether only a sample spread over the file was resolved: enough to rule the family out, so the
    #: counts are the sample's.
    sampled: bool = False
    #: How many matches share each place and geometry (algorithm, then role, dtype and shape of each
    #: tensor): what a summary of the file counts, gathered as the modules are placed.
    census: Counter[tuple[Place, tuple]] = field(default_factory=Counter)

    @cached_property
    def matches(self) -> list[Match]:
        """Each matched module with its component, path and naming, in module order."""
        return [
            Match(m, component, *hit)
            for run, component, hits in self.runs
            for m, hit in zip(run, hits, strict=True)
        ]

    def matches_of(self, keys: Iterable[str]) -> dict[str, Match]:
        """The matches of the modules with these keys (found without spelling out every match)."""
        wanted = set(keys)
        found = {}
        for run, component, hits in self.runs:
            for i in compress(range(len(run)), map(wanted.__contains__, map(_KEY, run))):
                found[run[i].key] = Match(run[i], component, *hits[i])
        return found

    def add(self, modules: Sequence[ParsedModule], component: Component, hits: list[tuple[str, str]]) -> None:
        """Record modules found in `component` at `hits` (while resolving, before `matches` is read)."""
        self.runs.append((modules, component, hits))
        self.matched += len(hits)

    @property
    def fits(self) -> bool:
        return bool(self.matched) and not self.unknown and not self.misfit and not self.sampled

    @property
    def modules(self) -> int:
        """How many modules were resolved (the sample's size when `sampled`)."""
        return self.matched + len(self.unknown) + len(self.misfit)

    def summary(self) -> str:
        parts = [f"{self.matched} of {self.modules} {'sampled ' if self.sampled else ''}modules fit"]
        if self.unknown:
            parts.append(f"unknown: {_examples(self.unknown)}")
        if self.misfit:
            parts.append(f"wrong shape: {_examples(self.misfit)}")
        return "; ".join(parts)


def _examples(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return f"{shown} (+{len(items) - limit} more)" if len(items) > limit else shown


_UNSEEN = object()
#: Modules resolved first, spread over the file, before a family gets the full pass.
SAMPLE = 32


def resolve(parsed: ParsedFile, header: Header, family: Family) -> Resolution:
    """Find each parsed module in `family` (by name, then by shape). Reads only the header."""
    return resolve_all(parsed, header, [family], exhaustive=True)[0]


def resolve_all(
    parsed: ParsedFile, header: Header, families: Iterable[Family], *, exhaustive: bool = False
) -> list[Resolution]:
    """`resolve` against several families at once, as detection and `choose_family` need.

    A family fits only if every module does, so each family first resolves a sample spread over the
    file; one the sample rules out keeps the sample's resolution (`sampled`) unless `exhaustive`.
    Kept lean because it runs for every family: each module's shapes are read once, components are
    looked up once per hint, and a shape verdict is computed once per (algorithm, layer, shapes) --
    files repeat a few geometries hundreds of times, and equal layers are one object
    (`Layer.from_spec`), shared across families.
    """
    tensors = header.tensors
    kinds: dict[tuple, int] = {}  # geometry -> small id, so verdict keys hash cheaply
    signatures = []
    for module in parsed.modules:
        geometry = [module.algorithm]
        for role, name in module.tensors.items():
            info = tensors[name]  # (dtype, shape, start, end): subscripts are cheaper than attributes
            geometry.append(role)
            geometry.append(info[0])
            geometry.append(info[1])
        signatures.append(kinds.setdefault(tuple(geometry), len(kinds)))
    space = Geometries(list(kinds), {i: dict(zip(g[1::3], g[3::3], strict=True)) for g, i in kinds.items()})
    modules = parsed.modules
    step = len(modules) // SAMPLE if len(modules) > 2 * SAMPLE else 0
    results = []
    for family in families:
        if step:  # a family that misplaces any of a sample's modules cannot fit: skip the full pass
            probe = _resolve(modules[::step], signatures[::step], space, family, census=False)
            if (probe.unknown or probe.misfit) and not exhaustive:
                probe.sampled = True
                results.append(probe)
                continue
        results.append(_resolve(modules, signatures, space, family))
    return results


@dataclass
class Geometries:
    """The distinct geometries of a file's modules, by id, and the shape verdicts found so far."""

    geometries: list[tuple]
    shapes: dict[int, dict[str, tuple[int, ...]]]
    verdicts: dict[tuple[int, int], str | None] = field(default_factory=dict)


def _resolve(
    modules: list[ParsedModule], signatures: list[int], space: Geometries, family: Family, census: bool = True
) -> Resolution:
    """Each run of modules sharing a hint is placed at C speed when every module's first name is in
    the hint's first component with shapes that fit (the common case); any other run goes module by
    module (`_resolve_each`), which gives the same answer where both apply."""
    result = Resolution(family)
    verdicts, shapes, geometries = space.verdicts, space.shapes, space.geometries
    counts: Counter[tuple[Place, int]] = Counter()  # the census, by geometry id (cheaper to hash)
    candidates_of: dict[tuple[int, bool], list[tuple[Component, Callable]]] = {}
    start = 0
    for (hint, flat), run in groupby(modules, _HINT_KEY):
        run = list(run)
        ids = signatures[start : start + len(run)]
        start += len(run)
        components = candidates_of.get((id(hint), flat))
        if components is None:
            components = candidates_of[id(hint), flat] = _components(family, hint, flat)
        if components:
            component = components[0][0]
            index = component.flat_index if flat else component.dotted_index
            hits = list(map(index.get, map(_FIRST_NAME, map(_NAMES, run))))
            if None not in hits:
                layers = list(map(component.modules.__getitem__, map(_PATH, hits)))
                pairs = set(zip(map(id, layers), ids, strict=True))  # files repeat a few of each
                unseen = pairs.difference(verdicts)
                if unseen:
                    layer_of = dict(zip(map(id, layers), layers, strict=True))
                    for layer_id, signature in unseen:
                        algorithm = ALGORITHMS[geometries[signature][0]]
                        verdicts[layer_id, signature] = algorithm.shape_problem(
                            shapes[signature], layer_of[layer_id]
                        )
                if not any(map(verdicts.__getitem__, pairs)):
                    result.add(run, component, hits)
                    if census:
                        counts.update(zip(map(component.places.__getitem__, hits), ids, strict=True))
                    continue
        _resolve_each(result, run, ids, space, components, counts if census else None)
    result.census.update({(place, geometries[signature]): n for (place, signature), n in counts.items()})
    return result


_HINT_KEY = attrgetter("hint", "flat")
_NAMES = attrgetter("names")
_KEY = attrgetter("key")
_FIRST_NAME = _PATH = itemgetter(0)


def _components(family: Family, hint: ComponentHint, flat: bool) -> list[tuple[Component, Callable]]:
    """The components a hint may mean, each with its lookup of flat or dotted names."""
    return [(c, c.resolve_flat if flat else c.resolve_dotted) for c in family.find_components(hint)]


def _resolve_each(
    result: Resolution,
    modules: list[ParsedModule],
    signatures: list[int],
    space: Geometries,
    candidates: list[tuple[Component, Callable]],
    counts: Counter | None,
) -> None:
    """Place modules one by one: the first candidate component and name whose shapes fit."""
    verdicts, shapes = space.verdicts, space.shapes
    for module, signature in zip(modules, signatures, strict=True):
        problem = layer = None
        for component, lookup in candidates:
            for name in module.names:
                hit = lookup(name)
                if hit is None:
                    continue
                layer = component.modules[hit[0]]
                key = (id(layer), signature)
                problem = verdicts.get(key, _UNSEEN)
                if problem is _UNSEEN:
                    algorithm = ALGORITHMS[module.algorithm]
                    problem = verdicts[key] = algorithm.shape_problem(shapes[signature], layer)
                if problem is None:
                    break
            else:
                continue
            break
        else:  # no candidate component holds a module of that name and shape
            if problem:
                result.misfit.append(f"{module.key} ({problem})")
                result.misfit_layers[module.key] = layer
            else:
                result.unknown.append(module.key)
            continue
        result.add((module,), component, [hit])
        if counts is not None:
            counts[component.places[hit], signature] += 1


Part = tuple[Header, ParsedFile]


def resolve_parts(parts: list[Part], family: Family) -> Resolution:
    """`resolve` over several files read together (e.g. one PEFT directory per component)."""
    return resolve_parts_all(parts, [family], exhaustive=True)[0]


def resolve_parts_all(
    parts: list[Part], families: Iterable[Family], *, exhaustive: bool = False
) -> list[Resolution]:
    """`resolve_parts` for several families, each part's shapes read once (`resolve_all`)."""
    families = list(families)
    if len(parts) == 1:
        return resolve_all(parts[0][1], parts[0][0], families, exhaustive=exhaustive)
    combined = [Resolution(family) for family in families]
    for header, parsed in parts:
        resolved = resolve_all(parsed, header, families, exhaustive=exhaustive)
        for total, single in zip(combined, resolved, strict=True):
            for run in single.runs:
                total.add(*run)
            total.unknown += single.unknown
            total.misfit += single.misfit
            total.misfit_layers.update(single.misfit_layers)
            total.census.update(single.census)
            total.sampled |= single.sampled
    return combined


def choose_family(parts: list[Part], context: ReadContext, where: str | os.PathLike) -> Resolution:
    """The one family that explains every module of every part, or a precise refusal."""
    if context.family is not None:
        if context.family not in context.families:
            known = ", ".join(context.families)
            raise UsageError(f"unknown family {context.family!r} (known: {known})")
        resolution = resolve_parts(parts, context.families[context.family])
        if not resolution.fits:
            raise UnsupportedError(
                f"does not fit family {context.family}: {resolution.summary()}", path=where
            )
        return resolution
    resolutions = resolve_parts_all(parts, context.families.values())
    fitting = [r for r in resolutions if r.fits]
    if len(fitting) == 1:
        return fitting[0]
    if fitting and all(_same_modules(fitting[0], other) for other in fitting[1:]):
        # e.g. an SDXL LoRA of its second text encoder alone, which SD3 shares: any choice reads and
        # writes the same modules under the same names, so the output cannot depend on it
        names = ", ".join(r.family.name for r in fitting)
        claimed = [r for r in fitting if _claimed(r.family, parts)]
        chosen = claimed[0] if len(claimed) == 1 else fitting[0]
        why = "as its metadata says" if len(claimed) == 1 else "the first installed"
        context.warnings.append(
            f"every module fits {names} with the same names and shapes; read as {chosen.family.name} ({why})"
        )
        return chosen
    if fitting:
        names = ", ".join(r.family.name for r in fitting)
        raise UnsupportedError(
            f"family is ambiguous: every module fits each of {names}; pass --family", path=where
        )
    if not resolutions:
        raise UnsupportedError("no model families are installed", path=where)
    closest = max(resolutions, key=lambda r: r.matched / (r.modules or 1))
    closest = resolve_parts(parts, closest.family)  # exact counts for the message
    raise UnsupportedError(
        f"no installed family knows every module; closest is {closest.family.name}: {closest.summary()}",
        path=where,
    )


def _claimed(family: Family, parts: list[Part]) -> bool:
    """Whether a file's metadata names `family` as its base model, as detection reads the claims
    (each format's `describe`, under its `base_model_keys`)."""
    from .evidence import describe
    from .plugins import registry

    _, claims = describe(list(registry.formats().values()), [header for header, _ in parts])
    return any(family.claimed_by(claim.value) for claim in claims)


def _same_modules(a: Resolution, b: Resolution) -> bool:
    """Whether two families resolve every module to the same component, path, naming and layer."""

    def seen(resolution: Resolution) -> list[tuple]:
        return sorted(
            (m.module.key, m.component.name, m.path, m.naming, m.component.modules[m.path])
            for m in resolution.matches
        )

    return seen(a) == seen(b)


def check_coverage(parsed: ParsedFile, header: Header) -> None:
    """Every tensor must be claimed exactly once: nothing is dropped silently."""
    if parsed.unsupported:
        reasons = Counter(parsed.unsupported.values())
        detail = "; ".join(f"{reason} ({count} tensors)" for reason, count in reasons.most_common(3))
        first = next(iter(parsed.unsupported))
        raise UnsupportedError(
            f"cannot convert {len(parsed.unsupported)} tensors, e.g. {first!r}: {detail}", path=header.path
        )
    for module in parsed.modules:
        shapes = {role: header.tensors[name].shape for role, name in module.tensors.items()}
        problem = ALGORITHMS[module.algorithm].factor_problem(shapes)
        if problem:
            raise InvalidFileError(f"{module.key}: {problem}", path=header.path)
    claimed = Counter(name for module in parsed.modules for name in module.tensors.values())
    twice = [name for name, count in claimed.items() if count > 1]
    missing = [name for name in header.tensors if name not in claimed]
    if twice or missing:
        raise UnsupportedError(f"tensors not understood: {_examples(missing or twice)}", path=header.path)


def assemble(fmt: Format, header: Header, parsed: ParsedFile, context: ReadContext) -> AdapterSet:
    return assemble_parts(fmt, [(header, parsed)], context, where=header.path)


def assemble_parts(
    fmt: Format, parts: list[Part], context: ReadContext, *, where: str | os.PathLike
) -> AdapterSet:
    """Resolve, check and build every module of one or more files of the same LoRA."""
    for header, parsed in parts:
        check_coverage(parsed, header)
    resolution = choose_family(parts, context, where)
    headers = {id(parsed): header for header, parsed in parts}
    sources = {id(header): SourceFile(header.path) for header, _ in parts}
    for header, _ in parts:
        if header.temporary:  # an unpickled copy, deleted after reading: keep a descriptor open
            sources[id(header)].open()
    part_of = {id(module): parsed for _, parsed in parts for module in parsed.modules}
    modules: dict[ModuleKey, Adapter] = {}
    origin: dict[ModuleKey, str] = {}
    used: dict[tuple[bool, str], Counter] = {}  # (flat?, component) -> namings seen
    reordered = 0
    for match in resolution.matches:
        header = headers[id(part_of[id(match.module)])]
        key = (match.component.name, match.path)
        if key in modules:
            raise InvalidFileError(
                f"{origin[key]} and {match.module.key} adapt the same module {key[1]}", path=where
            )
        source = sources[id(header)]
        roles = {role: FileTensor.named(source, header, name) for role, name in match.module.tensors.items()}
        extras = fmt.module_extras(header, match.component, match.path, roles)
        adapter = ALGORITHMS[match.module.algorithm].from_roles(roles, extras)
        layer = match.component.modules[match.path]
        adapter.check(layer, match.module.key)
        order = match.component.row_order(match.path, match.naming)
        if order is not None:  # this naming orders the output rows differently (shift/scale halves)
            try:
                adapter = reorder_rows(adapter, inverse(order), layer)
            except UnsupportedError as refusal:
                raise UnsupportedError(f"{match.module.key}: {refusal.message}", path=where) from None
            reordered += 1
        modules[key], origin[key] = adapter, match.module.key
        if not match.component.spelled_alike(match.path, match.naming):  # says nothing of the naming
            used.setdefault((match.module.flat, match.component.name), Counter())[match.naming] += 1
    namings = {"flat": {}, "dotted": {}}
    for (flat, component), counts in used.items():
        (naming, _), *others = counts.most_common()
        if others:
            context.warnings.append(f"{component} mixes namings {dict(counts)}; writing {naming} where asked")
        namings["flat" if flat else "dotted"][component] = naming
    metadata: dict[str, str] = {}
    for header, _ in parts:
        metadata.update(own_metadata(header.metadata))
        for kind, key in (("flat", NAMINGS_KEY), ("dotted", SPELLINGS_KEY)):
            for component, naming in _notes(header, key).items():
                if component not in namings[kind] and component in resolution.family.components:
                    namings[kind][component] = naming
    adapters = AdapterSet(
        family=resolution.family,
        modules=resolution.family.in_model_order(modules),
        metadata=metadata,
        provenance=Provenance(fmt.name, str(where), namings["flat"], namings["dotted"]),
        sources=list(sources.values()),
    )
    if reordered:
        adapters.provenance.steps.append(
            Step(
                stage="read",
                name="reorder rows",
                exactness=Exactness.IDENTICAL,
                modules=reordered,
                detail="output rows put in canonical order (e.g. shift/scale halves swapped)",
            )
        )
    for header, _ in parts:
        fmt.finish_read(adapters, header, context)
    return adapters


def _notes(header: Header, key: str) -> dict:
    try:
        value = parse_json(header.metadata.get(key, "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def own_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The source's metadata: our own notes removed, stashed foreign entries restored."""
    result = {k: v for k, v in metadata.items() if not k.startswith(NOTE_PREFIX)}
    try:
        stash = parse_json(metadata.get(STASH_KEY, "{}"))
    except ValueError:
        stash = {}
    if isinstance(stash, dict):
        for key, value in stash.items():
            if isinstance(value, str):
                result.setdefault(key, value)
    return result


def stash_foreign(metadata: dict[str, str], target: Format, formats: Iterable[Format]) -> dict[str, str]:
    """Move entries other formats own (and the target cannot honour) into `loraformats.stash`."""
    foreign = {
        key: value
        for key, value in metadata.items()
        if not target.owns(key) and any(f.owns(key) for f in formats if f.name != target.name)
    }
    result = {k: v for k, v in metadata.items() if k not in foreign}
    if foreign:
        result[STASH_KEY] = json.dumps(foreign, sort_keys=True)
    return result
