"""The planner: lower an adapter set until the target format can hold every module.

A deterministic lowering driven by the target's declared capabilities: for each module, while
it has a feature the target lacks, take the most exact registered transform that removes it.
Approximate transforms are taken only when the user allows lossy steps.
"""

from __future__ import annotations

from collections import Counter

from .adapters import Exactness
from .canonical import AdapterSet
from .errors import UnsupportedError
from .formats import Format
from .report import Step
from .transforms import Transform


def lower(
    adapters: AdapterSet, target: Format, transforms: dict[str, Transform], *, allow_lossy: bool = False
) -> tuple[AdapterSet, list[Step]]:
    taken: Counter[str] = Counter()
    ranked = sorted(transforms.values(), key=lambda t: t.exactness.rank)
    lowered = {}
    for key, adapter in adapters.modules.items():
        for _ in range(16):  # each transform removes a feature; a chain is short
            missing = adapter.features() - target.capabilities
            if not missing:
                break
            options = [t for t in ranked if t.removes in missing and t.applies(adapter)]
            if not allow_lossy:
                options = [t for t in options if t.exactness is not Exactness.APPROXIMATE]
            if not options:
                feature = sorted(missing)[0]
                raise UnsupportedError(
                    f"{target.name} cannot hold {feature} ({key[0]}:{key[1]}) and no exact re-expression "
                    f"is installed",
                    path=adapters.provenance.path,
                )
            transform = options[0]
            adapter = transform.apply(adapter, adapters.layer(key))
            taken[transform.name] += 1
        lowered[key] = adapter
    steps = [
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
    return result, steps
