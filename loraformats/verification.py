"""`verify`: apply two LoRA files to the same seeded random base and compare per module.

Adapters are maps W -> W', so the comparison is on W' - W for a random W (float64), which
catches scale, axis and naming mistakes that a comparison of factors would not.
"""

from __future__ import annotations

import os
import zlib

from pydantic import Field

from .adapters import Adapter
from .canonical import AdapterSet
from .conversion import load
from .deferred import DeferredModel
from .errors import UnsupportedError
from .families import Layer
from .layout import split_fused

#: Relative tolerance per storage dtype for values re-rounded once (float64 reference).
TOLERANCE = {"F64": 1e-12, "F32": 1e-6, "F16": 2e-3, "BF16": 1.6e-2}


class ModuleDifference(DeferredModel):
    module: str
    relative_error: float
    tolerance: float
    ok: bool


class VerifyReport(DeferredModel):
    schema_version: int = 1
    a: str
    b: str
    family: str
    modules: int
    max_relative_error: float
    ok: bool
    only_in_a: list[str] = Field(default_factory=list)
    only_in_b: list[str] = Field(default_factory=list)
    failures: list[ModuleDifference] = Field(default_factory=list)


def seeded_base(key: tuple[str, str], shape: tuple[int, ...], seed: int):
    """A deterministic random weight for one module (same for both files)."""
    import torch

    generator = torch.Generator().manual_seed(seed ^ zlib.crc32(f"{key[0]}:{key[1]}".encode()))
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def module_error(a: Adapter, b: Adapter, layer: Layer, key: tuple[str, str], seed: int) -> float:
    """Relative Frobenius difference of the changes W'_a - W and W'_b - W on one seeded base (float64).

    Low-rank changes are compared exactly through QR factors ([U_a, -U_b] [V_a; V_b] has small rank),
    so real-size modules cost milliseconds; other adapters are applied to a seeded random base.
    """
    import torch

    factors_a, factors_b = a.low_rank(layer), b.low_rank(layer)
    if factors_a is not None and factors_b is not None:

        def norm(u: torch.Tensor, v: torch.Tensor) -> float:
            return float(torch.linalg.norm(torch.linalg.qr(u).R @ torch.linalg.qr(v.T).R.T))

        (ua, va), (ub, vb) = factors_a, factors_b
        difference = norm(torch.cat([ua, -ub], 1), torch.cat([va, vb], 0))
        return difference / max(norm(ua, va), norm(ub, vb), 1e-300)
    if a.additive and b.additive:
        change_a, change_b = a.delta(layer), b.delta(layer)
    else:
        weight = seeded_base(key, layer.weight_shape, seed)
        change_a, change_b = a.apply(weight, layer) - weight, b.apply(weight, layer) - weight
    scale = max(float(change_a.norm()), float(change_b.norm()), 1e-300)
    return float((change_a - change_b).norm()) / scale


def compare(a: AdapterSet, b: AdapterSet, *, seed: int = 0, tolerance: float | None = None) -> VerifyReport:
    """Compare every module of two adapter sets (same family). Runs torch single-threaded: the
    per-module work is small, and thread hand-offs cost more than they save (5x on 2 cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compare(a, b, seed, tolerance)
    finally:
        torch.set_num_threads(threads)


def _compare(a: AdapterSet, b: AdapterSet, seed: int, tolerance: float | None) -> VerifyReport:
    if a.family.name != b.family.name:
        raise UnsupportedError(f"families differ ({a.family.name} vs {b.family.name}); nothing to compare")
    report = VerifyReport(
        a=a.provenance.path,
        b=b.provenance.path,
        family=a.family.name,
        modules=0,
        max_relative_error=0.0,
        ok=True,
    )
    if set(a.modules) != set(b.modules):  # one file may fuse what the other splits
        a, b = split_fused(a), split_fused(b)
    report.only_in_a = [f"{c}:{p}" for c, p in a.modules if (c, p) not in b.modules and _changes(a, (c, p))]
    report.only_in_b = [f"{c}:{p}" for c, p in b.modules if (c, p) not in a.modules and _changes(b, (c, p))]
    for key, adapter in a.modules.items():
        other = b.modules.get(key)
        if other is None:
            continue
        error = module_error(adapter, other, a.layer(key), key, seed)
        limit = (
            tolerance
            if tolerance is not None
            else max(TOLERANCE.get(adapter.dtype, 1e-6), TOLERANCE.get(other.dtype, 1e-6))
        )
        report.modules += 1
        report.max_relative_error = max(report.max_relative_error, error)
        if error > limit:
            report.failures.append(
                ModuleDifference(module=f"{key[0]}:{key[1]}", relative_error=error, tolerance=limit, ok=False)
            )
    report.ok = not (report.failures or report.only_in_a or report.only_in_b)
    return report


def _changes(adapters: AdapterSet, key: tuple[str, str]) -> bool:
    """Whether a module present in one file only changes anything (a member fused in with zero
    rows, because the other file did not adapt it, does not)."""
    adapter = adapters.modules[key]
    pair = adapter.low_rank(adapters.layer(key))
    if pair is None:
        return True
    return bool(pair[0].abs().max() > 0 and pair[1].abs().max() > 0)


def verify(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    *,
    family: str | None = None,
    seed: int = 0,
    tolerance: float | None = None,
    allow_pickle: bool = False,
) -> VerifyReport:
    with (
        load(path_a, family=family, allow_pickle=allow_pickle) as a,
        load(path_b, family=family or a.family.name, allow_pickle=allow_pickle) as b,
    ):
        return compare(a, b, seed=seed, tolerance=tolerance)
