"""Header-only detection: which format, which family, which algorithms, and why.

Every installed format scores the names; the formats that explain the file parse it, and every
installed family tries to resolve the parsed modules by name and shape. No tensor data is read.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Literal

from pydantic import BaseModel, Field

from .assemble import resolve
from .errors import LoraFormatsError
from .header import Header
from .plugins import registry
from .tensors import FileTensor, SourceFile

SCHEMA_VERSION = 1


class Candidate(BaseModel):
    name: str
    score: float
    reasons: list[str] = Field(default_factory=list)
    against: list[str] = Field(default_factory=list)


class ComponentSummary(BaseModel):
    name: str
    modules: int
    ranks: dict[str, int] = Field(description="rank -> number of modules")
    dtypes: list[str]


class Detection(BaseModel):
    """The answer to "what is this file". `unknown` and `ambiguous` are valid answers."""

    schema_version: Literal[1] = SCHEMA_VERSION
    path: str
    format: str
    family: str
    algorithms: list[str] = Field(default_factory=list)
    components: list[ComponentSummary] = Field(default_factory=list)
    alphas: dict[str, int] = Field(
        default_factory=dict,
        description="alpha value -> number of modules; filled only on request (alpha tensors are data)",
    )
    metadata_keys: int = 0
    tensors: int = 0
    reasons: list[str] = Field(default_factory=list)
    formats: list[Candidate] = Field(default_factory=list)
    families: list[Candidate] = Field(default_factory=list)


def _explains(fmt, header: Header) -> bool:
    """Whether the format's parse of the header fits exactly one family (header only)."""
    try:
        parsed = fmt.parse(header)
    except LoraFormatsError:
        return False
    if parsed.unsupported:
        return False
    return sum(resolve(parsed, header, f).fits for f in registry.families().values()) == 1


def complete_formats(header: Header) -> list:
    """Formats whose grammar explains every tensor name; ties broken by which ones fit a family."""
    complete = [fmt for fmt in registry.formats().values() if fmt.sniff(header).score >= 1.0]
    if len(complete) > 1:
        fitting = [fmt for fmt in complete if _explains(fmt, header)]
        return fitting or complete
    return complete


def detect(
    source: str | os.PathLike | Header, *, read_alphas: bool = False, allow_pickle: bool = False
) -> Detection:
    """Detect format and family from the header. `read_alphas` also reads the scalar alpha tensors."""
    if isinstance(source, Header):
        return _detect(source, read_alphas)
    from .conversion import open_header

    header = open_header(source, allow_pickle=allow_pickle)
    try:
        result = _detect(header, read_alphas)
    finally:
        if header.temporary:
            header.path.unlink(missing_ok=True)
    result.path = str(source)
    return result


def _detect(header: Header, read_alphas: bool) -> Detection:
    result = Detection(
        path=str(header.path),
        format="unknown",
        family="unknown",
        metadata_keys=len(header.metadata),
        tensors=len(header.tensors),
    )
    scored = []
    for fmt in registry.formats().values():
        evidence = fmt.sniff(header)
        scored.append((evidence, fmt))
        result.formats.append(
            Candidate(
                name=fmt.name,
                score=round(evidence.score, 4),
                reasons=evidence.reasons,
                against=evidence.against,
            )
        )
    result.formats.sort(key=lambda c: -c.score)
    complete = complete_formats(header)
    if len(complete) > 1:
        result.format = "ambiguous"
        result.reasons.append("several formats explain every name: " + ", ".join(f.name for f in complete))
        return result
    if not complete:
        result.reasons.append("no installed format explains every tensor name")
        return result
    fmt = complete[0]
    result.format = fmt.name
    try:
        parsed = fmt.parse(header)
    except LoraFormatsError as error:
        result.reasons.append(f"{fmt.name}: {error.message}")
        return result
    if parsed.unsupported:
        reasons = Counter(parsed.unsupported.values())
        result.reasons.append(
            "not convertible yet: " + "; ".join(f"{r} ({n})" for r, n in reasons.most_common(3))
        )
    result.algorithms = sorted({m.algorithm for m in parsed.modules})
    fitting = []
    for family in registry.families().values():
        resolution = resolve(parsed, header, family)
        total = len(parsed.modules) or 1
        candidate = Candidate(name=family.name, score=round(len(resolution.matches) / total, 4))
        if resolution.matches:
            candidate.reasons.append(resolution.summary())
        if resolution.unknown:
            candidate.against.append(
                f"{len(resolution.unknown)} module names unknown, e.g. {resolution.unknown[0]}"
            )
        if resolution.misfit:
            candidate.against.append(
                f"{len(resolution.misfit)} shapes do not fit, e.g. {resolution.misfit[0]}"
            )
        result.families.append(candidate)
        if resolution.fits:
            fitting.append(resolution)
    result.families.sort(key=lambda c: -c.score)
    if len(fitting) == 1:
        resolution = fitting[0]
        result.family = resolution.family.name
        result.reasons.append(f"every module resolves in {resolution.family.name} by name and shape")
        _summarise(result, header, resolution, read_alphas)
    elif fitting:
        result.family = "ambiguous"
        result.reasons.append(
            "the header fits several families equally: " + ", ".join(r.family.name for r in fitting)
        )
        _summarise(result, header, fitting[0], read_alphas)
    else:
        result.reasons.append("no installed family explains every module")
    return result


def _summarise(result: Detection, header: Header, resolution, read_alphas: bool) -> None:
    by_component: dict[str, list] = {}
    for match in resolution.matches:
        by_component.setdefault(match.component.name, []).append(match.module)
    for name, modules in by_component.items():
        ranks = Counter(
            str(header.tensors[m.tensors["down"]].shape[0]) for m in modules if "down" in m.tensors
        )
        dtypes = sorted(
            {header.tensors[t].dtype for m in modules for r, t in m.tensors.items() if r != "alpha"}
        )
        result.components.append(
            ComponentSummary(name=name, modules=len(modules), ranks=dict(ranks), dtypes=dtypes)
        )
    if read_alphas:
        source = SourceFile(header.path)
        try:
            for match in resolution.matches:
                name = match.module.tensors.get("alpha")
                if name:
                    info = header.tensors[name]
                    value = FileTensor(
                        source, header.data_start + info.start, info.dtype, info.shape
                    ).scalar()
                    key = str(int(value)) if value.is_integer() else repr(value)
                    result.alphas[key] = result.alphas.get(key, 0) + 1
        finally:
            source.close()
