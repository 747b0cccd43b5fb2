"""What a resolved file holds, from the header alone: modules per component and per block, with
their ranks, dtypes, algorithms and layer kinds.

Detection summarises every file it identifies, so this is a hot path: the resolver counts modules
by place and geometry as it places them (its census), and the summary folds those counts (no
object per tensor or module).
"""

from __future__ import annotations

from collections import Counter

from .alpha_values import read_alphas_of
from .assemble import Match, Part, Resolution
from .detection_result import ComponentSummary, Detection, ModuleGroup
from .families import CANONICAL
from .format_choice import FormatChoice
from .header import Header


def traits(geometry: tuple) -> tuple[str, str, str]:
    """(rank, dtype, algorithm) of a module geometry (algorithm, then role, dtype and shape of each
    tensor). The rank is the down factor's first dimension (`?` without one); the dtype is the up
    factor's (what `Adapter.dtype` reports), else the first factor's: alpha tensors do not count."""
    algorithm, roles, dtypes, shapes = geometry[0], geometry[1::3], geometry[2::3], geometry[3::3]
    rank = str(shapes[roles.index("down")][0]) if "down" in roles else "?"
    factors = [dtype for role, dtype in zip(roles, dtypes, strict=True) if role != "alpha"] or dtypes
    dtype = dtypes[roles.index("up")] if "up" in roles else factors[0]
    return rank, dtype, algorithm


# ------------------------------------------------------------------------------------------ in a result


def summarise(result: Detection, choice: FormatChoice, winner: Resolution, read_alphas: bool) -> None:
    """Components and block groups of the modules the (first) fitting family explains, folded from
    its census (modules counted by place and geometry)."""
    groups: dict[tuple[str, str], dict] = {}  # plain fields first: setting a model's field is slow
    components: dict[str, dict] = {}
    namings: dict[str, Counter] = {}
    known: dict[tuple, tuple[str, str, str]] = {}  # geometry -> traits: files repeat a few geometries
    for ((component, block, kind, naming), geometry), count in winner.census.items():
        found = known.get(geometry)
        rank, dtype, algorithm = found if found else known.setdefault(geometry, traits(geometry))
        group = groups.get((component, block))
        if group is None:
            group = groups[component, block] = _fields(
                component=component, block=block, algorithms=[], kinds={}
            )
        summary = components.get(component)
        if summary is None:
            summary = components[component] = _fields(name=component)
            namings[component] = Counter()
        for target in (group, summary):
            target["modules"] += count
            ranks = target["ranks"]
            ranks[rank] = ranks.get(rank, 0) + count
            if dtype not in target["dtypes"]:
                target["dtypes"].append(dtype)
        group["kinds"][kind] = group["kinds"].get(kind, 0) + count
        if algorithm not in group["algorithms"]:
            group["algorithms"].append(algorithm)
        namings[component][naming] += count
    for fields in (*groups.values(), *components.values()):
        fields["dtypes"].sort()
    for group in groups.values():
        group["algorithms"].sort()
    family = winner.family
    order = {name: i for i, name in enumerate(family.components)}
    positions = {name: family.components[name].block_order for name in components}

    def in_model_order(key: tuple[str, str]) -> tuple[int, int]:
        component, block = key
        return order[component], positions[component][block]

    result.groups = [ModuleGroup(**groups[key]) for key in sorted(groups, key=in_model_order)]
    result.components = [
        ComponentSummary(**components[name], naming=_naming(namings[name]))
        for name in sorted(components, key=order.__getitem__)
    ]
    odd = {c.name: c.naming for c in result.components if c.naming != CANONICAL}
    result.variant = "; ".join(f"{c}: {n}" for c, n in odd.items()) if odd else CANONICAL
    if read_alphas:
        by_block = {(group.component, group.block): group for group in result.groups}
        for match, value in read_alphas_of(choice.chosen, _matches_by_header(choice.parts, winner)):
            group = by_block[match.component.name, match.component.blocks[match.path]]
            group.alphas[value] = group.alphas.get(value, 0) + 1
            result.alphas[value] = result.alphas.get(value, 0) + 1


def _fields(**given: object) -> dict:
    """A group's or component's fields, counts empty."""
    return {**given, "modules": 0, "ranks": {}, "dtypes": []}


def _matches_by_header(parts: list[Part], winner: Resolution) -> list[tuple[Header, list[Match]]]:
    """The winner's matches with the header their tensors are in (one per file of a directory)."""
    if len(parts) == 1:
        return [(parts[0][0], winner.matches)]
    header_of = {id(m): h for h, parsed in parts for m in parsed.modules}
    by_header: dict[int, tuple[Header, list[Match]]] = {}
    for match in winner.matches:
        header = header_of[id(match.module)]
        by_header.setdefault(id(header), (header, []))[1].append(match)
    return list(by_header.values())


def _naming(seen: Counter) -> str:
    """The naming a component's names use; `mixed (a N, b M)` when a file mixes them. Names several
    namings share ("") count for whichever the others use."""
    if len(seen) > 1:
        seen = Counter({naming: count for naming, count in seen.items() if naming})
    if len(seen) == 1:
        return next(iter(seen)) or "canonical"
    return "mixed (" + ", ".join(f"{n} {c}" for n, c in seen.most_common()) + ")"
