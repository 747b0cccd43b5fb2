"""What a resolved file holds, from the header alone: modules per component and per block, with
their ranks, dtypes, algorithms and layer kinds.

Detection summarises every file it identifies, so this is a hot path: one small tuple per
module, counted, then folded into groups (no object per tensor).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from .alpha_values import read_alphas_of
from .assemble import Match, Part, Resolution
from .detection_result import ComponentSummary, Detection, ModuleGroup
from .families import CANONICAL, Component
from .format_choice import FormatChoice
from .header import Header

#: Module path -> block, per component (built once per component; families live for the process).
_BLOCKS: dict[int, tuple[Component, dict[str, str]]] = {}


def block_of(path: str) -> str:
    """The block a module path belongs to: the path up to its first index (`down_blocks.1`,
    `text_model.encoder.layers.3`, `mid_block.attentions.0`), else its first segment (`conv_in`).
    Generic on purpose: the core knows no family, and every family numbers its repeated blocks."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def blocks(component: Component) -> dict[str, str]:
    """`block_of` for every module of a component, in model order (cached per component)."""
    cached = _BLOCKS.get(id(component))
    if cached is None or cached[0] is not component:
        cached = _BLOCKS[id(component)] = (component, {path: block_of(path) for path in component.modules})
    return cached[1]


#: component, block, rank, dtype, algorithm, layer kind, naming
Signature = tuple[str, str, int | None, str, str, str, str]


def signatures(parts: Iterable[tuple[Header, list[Match]]]) -> Counter[Signature]:
    """How many modules share each (component, block, rank, dtype, algorithm, layer kind, naming).

    The dtype is the up factor's (what `Adapter.dtype` reports); alpha tensors do not count. A name
    several namings share tells nothing about the naming, so its naming is "".
    """
    counts: Counter[Signature] = Counter()
    tables: dict[int, tuple[dict[str, str], dict, frozenset]] = {}  # per component
    for header, matches in parts:
        tensors = header.tensors
        for module, component, path, naming in matches:
            table = tables.get(id(component))
            if table is None:
                table = tables[id(component)] = (
                    blocks(component),
                    component.modules,
                    component.spelled_alike,
                )
            roles = module.tensors
            down, up = roles.get("down"), roles.get("up")
            key = (
                component.name,
                table[0][path],
                tensors[down].shape[0] if down else None,
                tensors[up or next(iter(roles.values()))].dtype,
                module.algorithm,
                table[1][path].kind,
                "" if (path, naming) in table[2] else naming,
            )
            counts[key] += 1
    return counts


#: Block -> position in model order, per component (cached like `_BLOCKS`).
_ORDER: dict[int, tuple[Component, dict[str, int]]] = {}


def model_order(component: Component) -> dict[str, int]:
    """Position of each block of a component in model order (first module of the block)."""
    cached = _ORDER.get(id(component))
    if cached is None or cached[0] is not component:
        order: dict[str, int] = {}
        for block in blocks(component).values():
            order.setdefault(block, len(order))
        cached = _ORDER[id(component)] = (component, order)
    return cached[1]


# ------------------------------------------------------------------------------------------ in a result


def summarise(result: Detection, choice: FormatChoice, winner: Resolution, read_alphas: bool) -> None:
    """Components and block groups of the modules the (first) fitting family explains."""
    parts = _matches_by_header(choice.parts, winner)
    groups: dict[tuple[str, str], ModuleGroup] = {}
    components: dict[str, ComponentSummary] = {}
    namings: dict[str, Counter] = {}
    for (component, block, rank, dtype, algorithm, kind, naming), count in signatures(parts).items():
        group = groups.get((component, block))
        if group is None:
            group = groups[(component, block)] = ModuleGroup(
                component=component, block=block, modules=0, ranks={}, dtypes=[], algorithms=[], kinds={}
            )
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
        for match, value in read_alphas_of(choice.chosen, parts):
            group = groups[(match.component.name, blocks(match.component)[match.path])]
            group.alphas[value] = group.alphas.get(value, 0) + 1
            result.alphas[value] = result.alphas.get(value, 0) + 1
    family = winner.family
    order = {name: i for i, name in enumerate(family.components)}
    positions = {name: model_order(family.components[name]) for name in components}
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
