"""What a resolved file holds, from the header alone: modules per component and per block, with
their ranks, dtypes, algorithms and layer kinds.

Detection summarises every file it identifies, so this is a hot path: one small tuple per
module, counted, then folded into groups (no object per tensor).
"""

from __future__ import annotations

from collections import Counter

from .alpha_values import read_alphas_of
from .assemble import Match, Part, Resolution
from .detection_result import ComponentSummary, Detection, ModuleGroup
from .families import CANONICAL, Place
from .format_choice import FormatChoice
from .header import Header

#: component, block, rank, dtype, algorithm, layer kind, naming
Signature = tuple[str, str, int | None, str, str, str, str]


def signatures(census: Counter[tuple[Place, tuple]]) -> Counter[Signature]:
    """How many modules share each (component, block, rank, dtype, algorithm, layer kind, naming),
    from a resolution's census. The rank is the down factor's first dimension; the dtype is the up
    factor's (what `Adapter.dtype` reports), else the first factor's: alpha tensors do not count."""
    counts: Counter[Signature] = Counter()
    for ((component, block, kind, naming), geometry), count in census.items():
        algorithm, roles, dtypes, shapes = geometry[0], geometry[1::3], geometry[2::3], geometry[3::3]
        rank = shapes[roles.index("down")][0] if "down" in roles else None
        factors = [dtype for role, dtype in zip(roles, dtypes, strict=True) if role != "alpha"] or dtypes
        dtype = dtypes[roles.index("up")] if "up" in roles else factors[0]
        counts[component, block, rank, dtype, algorithm, kind, naming] += count
    return counts


# ------------------------------------------------------------------------------------------ in a result


def summarise(result: Detection, choice: FormatChoice, winner: Resolution, read_alphas: bool) -> None:
    """Components and block groups of the modules the (first) fitting family explains."""
    groups: dict[tuple[str, str], ModuleGroup] = {}
    components: dict[str, ComponentSummary] = {}
    namings: dict[str, Counter] = {}
    for (component, block, rank, dtype, algorithm, kind, naming), count in signatures(winner.census).items():
        group = groups.get((component, block))
        if group is None:
            group = groups[(component, block)] = ModuleGroup.model_construct(  # built from checked values
                component=component,
                block=block,
                modules=0,
                ranks={},
                alphas={},
                dtypes=[],
                algorithms=[],
                kinds={},
            )  # every field given: pydantic inspects a default factory's signature on each call
        summary = components.get(component)
        if summary is None:
            summary = components[component] = ComponentSummary(name=component, modules=0, ranks={}, dtypes=[])
            namings[component] = Counter()
        rank_key = "?" if rank is None else str(rank)
        for target in (group, summary):
            target.modules += count
            target.ranks[rank_key] = target.ranks.get(rank_key, 0) + count
            if dtype not in target.dtypes:
                target.dtypes.append(dtype)
        group.kinds[kind] = group.kinds.get(kind, 0) + count
        if algorithm not in group.algorithms:
            group.algorithms.append(algorithm)
        namings[component][naming] += count
    if read_alphas:
        for match, value in read_alphas_of(choice.chosen, _matches_by_header(choice.parts, winner)):
            group = groups[(match.component.name, match.component.blocks[match.path])]
            group.alphas[value] = group.alphas.get(value, 0) + 1
            result.alphas[value] = result.alphas.get(value, 0) + 1
    family = winner.family
    order = {name: i for i, name in enumerate(family.components)}
    positions = {name: family.components[name].block_order for name in components}
    result.groups = sorted(
        groups.values(), key=lambda g: (order[g.component], positions[g.component][g.block])
    )
    for group in result.groups:
        group.dtypes.sort()
        group.algorithms.sort()
    result.components = sorted(components.values(), key=lambda c: order[c.name])
    for summary in result.components:
        summary.dtypes.sort()
        summary.naming = _naming(namings[summary.name])
    odd = {c.name: c.naming for c in result.components if c.naming != CANONICAL}
    result.variant = "; ".join(f"{c}: {n}" for c, n in odd.items()) if odd else CANONICAL


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
