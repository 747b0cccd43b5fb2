"""Header-only detection: which format, which family, which algorithms, and why.

Every installed format sniffs the names (and describes the metadata); the one that explains the
file parses it, and every installed family resolves the parsed modules by name and shape
(`assemble.resolve`). Tensor evidence decides; metadata that disagrees is reported as a
contradiction, never followed. No tensor data is read unless `read_alphas` asks for the scalar
alphas. `unknown` and `ambiguous` are answers, not errors.
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from operator import attrgetter
from pathlib import Path

from . import format_choice
from .assemble import Part, Resolution, resolve_parts, resolve_parts_all
from .detection_result import SCHEMA_VERSION, Candidate, ComponentSummary, Detection, ModuleGroup
from .evidence import ambiguity, claimed_families, describe, report_claims, score_families
from .families import Family
from .format_choice import FormatChoice
from .formats import ParsedFile
from .header import Header, parse_header
from .pickles import open_header, temporaries_removed
from .plugins import registry
from .summary import summarise

__all__ = [
    "SCHEMA_VERSION", "Candidate", "ComponentSummary", "Detection", "ModuleGroup",
    "detect", "detect_headers", "header_from_bytes",
]  # fmt: skip

#: A contradiction between metadata and tensors lowers confidence by this factor: the tensors still
#: decide, but a file that misdescribes itself deserves a second look.
CONTRADICTION_FACTOR = 0.9


def detect(
    source: str | os.PathLike | Header | bytes,
    *,
    read_alphas: bool = False,
    allow_pickle: bool = False,
) -> Detection:
    """Identify a LoRA from its header: a path (file or directory), a parsed `Header`, or raw header
    bytes (with or without the 8-byte length prefix, e.g. fetched with an HTTP range request).

    `read_alphas` also reads the scalar alpha tensors (the only tensor data detection ever reads).
    """
    return detect_headers(source, read_alphas=read_alphas, allow_pickle=allow_pickle)[0]


def detect_headers(
    source: str | os.PathLike | Header | bytes, *, read_alphas: bool = False, allow_pickle: bool = False
) -> tuple[Detection, list[Header]]:
    """`detect`, also returning the validated headers it read (for `inspect`'s size accounting)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = header_from_bytes(bytes(source))
    if isinstance(source, Header):
        return _detect(format_choice.for_header(source), str(source.path), read_alphas), [source]
    path = Path(source)
    if path.is_dir():
        choice = format_choice.for_directory(path, allow_pickle)
        headers = [header for header, _ in choice.parts]
    else:
        headers = [open_header(path, allow_pickle=allow_pickle)]
        choice = format_choice.for_header(headers[0])
    with temporaries_removed(headers):
        return _detect(choice, str(source), read_alphas), headers


def header_from_bytes(raw: bytes) -> Header:
    """A validated header from bytes: the JSON alone, or the file's first 8 + N bytes."""
    if raw[:1] != b"{" and len(raw) >= 8:
        (n,) = struct.unpack("<Q", raw[:8])
        raw = raw[8 : 8 + n]
    return parse_header(raw)


def _detect(choice: FormatChoice, where: str, read_alphas: bool) -> Detection:
    """Families, evidence and summaries for a format choice."""
    headers = [header for header, _ in choice.parts]
    result = Detection(
        path=where,
        format=choice.status,
        family="unknown",
        metadata_keys=sum(len(h.metadata) for h in headers),
        tensors=sum(len(h.tensors) for h in headers),
    )
    result.formats = sorted(
        (
            Candidate(name=name, score=round(said.score, 4), reasons=said.reasons, against=said.against)
            for name, said in choice.evidence.items()
        ),
        key=lambda c: -c.score,
    )
    result.reasons += choice.reasons
    families = registry.families()
    result.metadata, claims = describe(list(registry.formats().values()), headers)
    claims = claimed_families(claims, families)
    if choice.chosen is None:
        report_claims(result, claims, {}, [])
        return result
    unsupported = Counter(why for _, parsed in choice.parts for why in parsed.unsupported.values())
    if unsupported:
        result.reasons.append(
            "not convertible yet: " + "; ".join(f"{r} ({n})" for r, n in unsupported.most_common(3))
        )
    result.algorithms = _algorithms([parsed for _, parsed in choice.parts])
    resolutions = choice.resolutions or _resolve(choice.parts, families)
    for claim in claims:  # a family the metadata names deserves exact evidence, if it is ruled out
        for name in claim.families:
            if resolutions[name].sampled:
                resolutions[name] = resolve_parts(choice.parts, families[name])
    fitting = [r for r in resolutions.values() if r.fits]
    ruled_out = score_families(result, resolutions, fitting)
    winner = fitting[0] if fitting else None
    if len(fitting) == 1:
        result.family = winner.family.name
        result.reasons.append(f"every module resolves in {winner.family.name} by name and shape")
        result.reasons += ruled_out
        _releases(result, winner)
    elif fitting:
        result.family = "ambiguous"
        result.reasons.append("the header fits several families equally: " + ambiguity(fitting))
    else:
        result.reasons.append("no installed family explains every module")
    report_claims(result, claims, resolutions, fitting)
    if winner is not None:
        summarise(result, choice, winner, read_alphas)
    family_share = 1 / len(fitting) if fitting else 0.0
    penalty = CONTRADICTION_FACTOR if result.contradictions else 1.0
    result.confidence = round(choice.share * family_share * penalty, 4)
    return result


def _algorithms(parsed: list[ParsedFile]) -> list[str]:
    """The algorithms of the parsed modules; a module of nothing but an alpha (its factors
    unsupported) says nothing."""
    modules = [module for part in parsed for module in part.modules]
    found = set(map(attrgetter("algorithm"), modules))
    return sorted(
        algorithm
        for algorithm in found
        if any(m.algorithm == algorithm and len(m.tensors) > ("alpha" in m.tensors) for m in modules)
    )


def _releases(result: Detection, winner: Resolution) -> None:
    """Which of the family's releases the file can be for, and a reason when several remain."""
    family = winner.family
    if not family.releases:
        return
    adapted = {(component.name, path) for _, component, hits in winner.runs for path, _ in hits}
    result.releases = family.releases_for(adapted)
    if len(result.releases) > 1:
        result.reasons.append(
            f"release ambiguous: {', '.join(result.releases)} share every module this file adapts; "
            "the header cannot tell them apart"
        )
    elif result.releases:
        result.reasons.append(f"release: {result.releases[0]} (the others lack modules this file adapts)")


def _resolve(parts: list[Part], families: dict[str, Family]) -> dict[str, Resolution]:
    return dict(zip(families, resolve_parts_all(parts, families.values()), strict=True))
