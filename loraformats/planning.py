"""The planner: lower an adapter set until the target format can hold every module.

A deterministic lowering driven by the target's declared capabilities. For each module it searches
the short chains of registered transforms that remove every feature the target lacks, and takes
the best: the most exact worst step, then the fewest steps, then registration order. Approximate
edges are taken only when the user allows lossy steps. When the user asks for a rank or an error
bound (`--rank`, `--max-error`), every additive module is first compressed by truncated SVD, the
one lossy edge, and the error of each module is measured and reported (`Approximation`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .adapters import Adapter, Exactness, LoRA
from .canonical import AdapterSet, ModuleKey
from .errors import LoraFormatsError, UnsupportedError, UsageError
from .families import Layer
from .formats import Format
from .layout import lay_out
from .report import Approximation, ModuleApproximation, Step
from .transforms import SvdCompress, Transform, inner_of

#: Longest chain of transforms tried for one module (LoHa -> LoRA + Tucker -> LoRA is two).
MAX_CHAIN = 4


@dataclass
class Plan:
    adapters: AdapterSet
    steps: list[Step]
    approximation: Approximation | None = None
    routes: dict[ModuleKey, list[str]] = field(default_factory=dict)


def lower(
    adapters: AdapterSet,
    target: Format,
    transforms: dict[str, Transform],
    *,
    allow_lossy: bool = False,
    rank: int | None = None,
    max_error: float | None = None,
) -> tuple[AdapterSet, list[Step]]:
    """`plan` without the approximation details (kept for callers of the first API)."""
    result = plan(adapters, target, transforms, allow_lossy=allow_lossy, rank=rank, max_error=max_error)
    return result.adapters, result.steps


def plan(
    adapters: AdapterSet,
    target: Format,
    transforms: dict[str, Transform],
    *,
    allow_lossy: bool = False,
    rank: int | None = None,
    max_error: float | None = None,
    options: Any = None,
) -> Plan:
    """Lower every module of `adapters` for `target`: compress first when a rank or error bound is
    asked, then lay the modules out in the target's naming (fused groups), then remove features."""
    steps: list[Step] = []
    modules = dict(adapters.modules)
    approximation = None
    if rank is not None or max_error is not None:
        modules, approximation, step = _compress(adapters, modules, rank, max_error)
        if step is not None:
            steps.append(step)
    edges = list(transforms.values())

    def reexpress(adapter: Adapter, layer: Layer, features: frozenset[str]):
        route = best_route(adapter, layer, features, edges, allow_lossy)
        if route is None:
            return None
        for transform in route:
            adapter = transform.apply(adapter, layer)
        return adapter, route

    compressed = AdapterSet(
        adapters.family, modules, adapters.metadata, adapters.provenance, adapters.sources
    )
    modules, layout_steps = lay_out(compressed, target, options, reexpress)
    steps += layout_steps
    taken: Counter[str] = Counter()
    routes: dict[ModuleKey, list[str]] = {}
    lowered = {}
    for key, adapter in modules.items():
        layer = adapters.layer(key)
        route = best_route(adapter, layer, target.capabilities, edges, allow_lossy)
        if route is None:
            raise _refusal(adapters, key, adapter, layer, target, edges, allow_lossy)
        for transform in route:
            adapter = transform.apply(adapter, layer)
            taken[transform.name] += 1
        routes[key] = [t.name for t in route]
        lowered[key] = adapter
    steps += [
        Step(
            stage="transform",
            name=name,
            exactness=transforms[name].exactness,
            modules=count,
            detail=transforms[name].description,
        )
        for name, count in taken.items()
    ]
    result = AdapterSet(adapters.family, lowered, adapters.metadata, adapters.provenance, adapters.sources)
    return Plan(result, steps, approximation, routes)


def best_route(
    adapter: Adapter, layer: Layer, capabilities: frozenset[str], edges: list[Transform], allow_lossy: bool
) -> list[Transform] | None:
    """The best chain of transforms after which the target holds `adapter` ([] if it already does)."""
    if adapter.features() <= capabilities:  # the common case: nothing to search
        return []
    best: tuple[tuple[int, int, tuple[int, ...]], list[Transform]] | None = None
    order = {id(edge): i for i, edge in enumerate(edges)}

    def search(current: Adapter, path: list[Transform], worst: Exactness) -> None:
        nonlocal best
        missing = current.features() - capabilities
        if not missing:
            cost = (worst.rank, len(path), tuple(order[id(t)] for t in path))
            if best is None or cost < best[0]:
                best = (cost, list(path))
            return
        if len(path) == MAX_CHAIN or (best is not None and worst.rank > best[0][0]):
            return
        for edge in edges:
            if edge.exactness is Exactness.APPROXIMATE and not allow_lossy:
                continue
            if not any(edge.removes_feature(f) for f in missing) or not edge.applies(current):
                continue
            try:
                following = edge.apply(current, layer)
            except LoraFormatsError:
                continue  # the edge cannot take this particular module
            search(following, [*path, edge], worst.worst(edge.exactness))

    search(adapter, [], Exactness.IDENTICAL)
    return None if best is None else best[1]


def _refusal(
    adapters: AdapterSet,
    key: ModuleKey,
    adapter: Adapter,
    layer: Layer,
    target: Format,
    edges: list[Transform],
    allow_lossy: bool,
) -> UnsupportedError:
    missing = adapter.features() - target.capabilities
    stuck = [f for f in missing if not any(e.removes_feature(f) and e.applies(adapter) for e in edges)]
    feature = sorted(stuck or missing, key=lambda f: (-f.count("."), f))[0]  # the most specific
    message = (
        f"{target.name} cannot hold {feature} ({key[0]}:{key[1]}) and no exact re-expression is installed"
    )
    if not allow_lossy and best_route(adapter, layer, target.capabilities, edges, True) is not None:
        message += "; an approximate one is installed (allow_lossy=True in the Python API)"
    elif feature.startswith(("full.bias", "norm")):
        message += " (bias and norm-layer deltas have no LoRA form)"
    return UnsupportedError(message, path=adapters.provenance.path)


def _compress(
    adapters: AdapterSet, modules: dict[ModuleKey, Adapter], rank: int | None, max_error: float | None
) -> tuple[dict[ModuleKey, Adapter], Approximation, Step | None]:
    if rank is not None and rank < 1:
        raise UsageError(f"--rank must be at least 1, got {rank}")
    if max_error is not None and not 0 <= max_error < 1:
        raise UsageError(f"--max-error is a relative error in [0, 1), got {max_error}")
    compress = SvdCompress(rank, max_error)
    approximation = Approximation(rank=rank, max_error=max_error)
    errors = norms = 0.0
    result = dict(modules)
    for key, adapter in modules.items():
        if not compress.applies(adapter):
            approximation.kept += isinstance(inner_of(adapter), LoRA)  # already within the rank
            continue
        result[key], cut = compress.compress(adapter, adapters.layer(key))
        approximation.modules[f"{key[0]}:{key[1]}"] = ModuleApproximation(
            rank=cut.rank, relative_error=cut.relative_error
        )
        errors += cut.error**2
        norms += cut.norm**2
    if not approximation.modules:
        return result, approximation, None
    approximation.relative_error = (errors / norms) ** 0.5 if norms else 0.0
    approximation.max_relative_error = max(m.relative_error for m in approximation.modules.values())
    ranks = sorted({m.rank for m in approximation.modules.values()})
    step = Step(
        stage="transform",
        name=compress.name,
        exactness=Exactness.APPROXIMATE,
        modules=len(approximation.modules),
        detail=(
            f"{compress.description}: ranks {ranks[0]}..{ranks[-1]}, relative error "
            f"{approximation.relative_error:.6g} overall, {approximation.max_relative_error:.6g} worst module"
        ),
    )
    return result, approximation, step
