"""Lay an adapter set out in the target's naming: every module must have a name there.

A naming that names a fused group but not its members (BFL's `img_attn.qkv`) needs the members
fused; one that names the members but not the group (diffusers' `to_q`, `to_k`, `to_v`) needs the
group split; a naming that orders a module's output rows differently (BFL's shift/scale halves)
needs them reordered. Which naming the target writes is the format's answer (`Format.naming`).
Adapters that cannot be cut or stacked as they are (a LoKr whose blocks straddle a split, a
Tucker LoHa) are first re-expressed as LoRAs by the exact transforms, or refused with the reason.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .adapters import Adapter, Exactness
from .canonical import AdapterSet, ModuleKey
from .errors import UnsupportedError
from .families import Layer
from .formats import Format
from .fusion import reorder_rows, stack_rows
from .report import Step

if TYPE_CHECKING:
    from .transforms import Transform

#: What members are re-expressed as when they cannot be cut or stacked as they are.
STACKABLE = frozenset({"lora", "dora", "dora.output", "full"})

Reexpress = Callable[[Adapter, Layer, frozenset[str]], "tuple[Adapter, list[Transform]] | None"]


def lay_out(
    adapters: AdapterSet, target: Format, options: Any, reexpress: Reexpress
) -> tuple[dict[ModuleKey, Adapter], list[Step]]:
    """The modules keyed by paths the target can name, with the steps that took.

    `reexpress(adapter, layer, features)` finds an exact route to an adapter holding only `features`.
    """
    namings = {
        name: target.naming(adapters, adapters.component(name), options)
        for name in adapters.components_used()
    }
    result: dict[ModuleKey, Adapter] = {}
    members: dict[ModuleKey, dict[str, Adapter]] = {}  # group key -> member path -> adapter
    counts: Counter[str] = Counter()
    worst: dict[str, Exactness] = {}
    reexpressed: Counter[str] = Counter()

    def lowered(adapter: Adapter, layer: Layer, refusal: UnsupportedError, where: str) -> Adapter:
        found = reexpress(adapter, layer, STACKABLE)
        if found is None:
            raise UnsupportedError(
                f"{where}: {refusal.message}, and it has no exact LoRA form", path=adapters.provenance.path
            ) from None
        for transform in found[1]:
            reexpressed[transform.name] += 1
        return found[0]

    def cut(adapter: Adapter, layer: Layer, action: Callable[[Adapter], Adapter], where: str) -> Adapter:
        try:
            return action(adapter)
        except UnsupportedError as refusal:
            return action(lowered(adapter, layer, refusal, where))

    def place(into: dict, slot: object, adapter: Adapter, key: ModuleKey) -> None:
        if slot in into:
            raise UnsupportedError(
                f"{key[0]}:{key[1]} is adapted both on its own and inside a fused module",
                path=adapters.provenance.path,
            )
        into[slot] = adapter

    queue = deque(adapters.modules.items())
    while queue:  # a split group's members may go on into another group (XLabs qkv -> BFL linear1)
        key, adapter = queue.popleft()
        component, (name, path) = adapters.component(key[0]), key
        naming = namings[name]
        fusing = [g for g in component.groups_of.get(path, ()) if component.nameable(g, naming)]
        if component.nameable(path, naming):
            place(result, key, adapter, key)
        elif path in component.groups:
            layer, bounds, start = component.modules[path], [], 0
            for member in component.groups[path]:
                bounds.append((member, start, start + component.modules[member].out_features))
                start = bounds[-1][2]
            split = lambda a, b=bounds, c=name: [((c, m), a.rows(s, e)) for m, s, e in b]  # noqa: E731
            try:
                queue += split(adapter)
            except UnsupportedError as refusal:  # re-expressed once, for every member
                queue += split(lowered(adapter, layer, refusal, f"{name}:{path}"))
            counts["split"] += 1
        elif fusing:
            place(members.setdefault((name, fusing[0]), {}), path, adapter, key)
        else:
            raise UnsupportedError(
                f"{target.name} has no name for {name}:{path} in its {naming} naming",
                path=adapters.provenance.path,
            )
    for (name, group), found in members.items():
        component = adapters.component(name)
        paths = component.groups[group]
        layers = [component.modules[m] for m in paths]
        where = f"{name}:{group}"
        try:
            try:
                fused = stack_rows([found.get(m) for m in paths], layers)
            except UnsupportedError as refusal:
                found = {m: lowered(a, component.modules[m], refusal, where) for m, a in found.items()}
                fused = stack_rows([found.get(m) for m in paths], layers)
        except UnsupportedError as refusal:
            raise UnsupportedError(f"{where}: {refusal.message}", path=adapters.provenance.path) from None
        label = f"fuse ({fused.how})"
        counts[label] += 1
        worst[label] = worst.get(label, Exactness.IDENTICAL).worst(fused.exactness)
        place(result, (name, group), fused.adapter, (name, next(iter(found))))
    for key, adapter in result.items():
        component = adapters.component(key[0])
        order = component.row_order(key[1], namings[key[0]])
        if order is not None:
            layer = component.modules[key[1]]
            reorder = lambda a, o=order, lay=layer: reorder_rows(a, o, lay)  # noqa: E731
            result[key] = cut(adapter, layer, reorder, f"{key[0]}:{key[1]}")
            counts["reorder rows"] += 1
    return adapters.family.in_model_order(result), _steps(counts, worst, reexpressed, namings)


def _steps(
    counts: Counter[str],
    worst: dict[str, Exactness],
    reexpressed: Counter[str],
    namings: dict[str, str],
) -> list[Step]:
    details = {
        "split": "fused modules split into their members: down shared, up rows sliced",
        "fuse (shared)": "members with one shared down and scale fused at their rank: up rows stacked",
        "fuse (block-diagonal)": "members fused at their summed rank: downs stacked, ups block-diagonal, "
        "alpha keeps each scale",
        "fuse (stacked)": "full deltas stacked by rows",
        "reorder rows": "output rows reordered for this naming (e.g. shift/scale halves swapped)",
    }
    steps = [
        Step(
            stage="transform",
            name=f"re-express for fused layers: {name}",
            exactness=Exactness.ROUNDED,
            modules=count,
            detail="members that cannot be cut or stacked as they are, re-expressed exactly as LoRAs",
        )
        for name, count in reexpressed.items()
    ]
    for name, count in counts.items():
        steps.append(
            Step(
                stage="transform",
                name=name,
                exactness=worst.get(name, Exactness.IDENTICAL),
                modules=count,
                detail=f"{details[name]} ({', '.join(f'{c} in {n} naming' for c, n in namings.items())})",
            )
        )
    return steps


class _CanonicalLayout(Format):
    name = "canonical layout"
    label = "every module under its canonical path"


def split_fused(adapters: AdapterSet) -> AdapterSet:
    """The set with every fused group split into its members: how `verify` lines up a file in an
    original naming (BFL's fused qkv) with one in the diffusers layout."""
    if not any(path in adapters.component(name).groups for name, path in adapters.modules):
        return adapters
    modules, _ = lay_out(adapters, _CanonicalLayout(), None, lambda adapter, layer, features: None)
    return AdapterSet(adapters.family, modules, adapters.metadata, adapters.provenance, adapters.sources)
