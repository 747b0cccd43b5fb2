"""Which format a file (or directory) is in: every installed format gives its evidence, and the one
that explains every name parses the file. Header only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .assemble import Part, Resolution, resolve_all
from .errors import LoraFormatsError
from .formats import SAMPLE_NAMES, Evidence, Format, ParsedFile, ReadContext
from .header import Header
from .plugins import registry


@dataclass
class FormatChoice:
    """The format verdict: `status` is the format's name, `ambiguous` or `unknown`; `parts` are the
    parsed files of the chosen format; `share` is how much of the file it explains."""

    evidence: dict[str, Evidence]
    chosen: Format | None = None
    status: str = "unknown"
    share: float = 0.0
    parts: list[Part] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    #: Family resolutions already computed to break a tie between formats (reused, not redone).
    resolutions: dict[str, Resolution] = field(default_factory=dict)

    def choose(self, fmt: Format, share: float, parts: list[Part]) -> None:
        self.chosen, self.status, self.share, self.parts = fmt, fmt.name, share, parts


def sniff_all(header: Header, *, exhaustive: bool = False) -> dict[str, Evidence]:
    """Every installed format's evidence about the header's names.

    A format explains every name of a file only if it explains every name of a sample of it (the
    contract of `Format.sniff`), so every format first sniffs names spread across the file, and only
    those that explain all of them read every name. When none of those explains the whole file,
    every format reads every name (`mostly` ranks partial shares), as with `exhaustive`.
    """
    formats = registry.formats()
    names = list(header.tensors)
    if exhaustive or len(names) <= 2 * SAMPLE_NAMES:
        return {name: fmt.sniff(header) for name, fmt in formats.items()}
    sample = replace(header, tensors={n: header.tensors[n] for n in names[:: len(names) // SAMPLE_NAMES]})
    evidence = {name: fmt.sniff(sample) for name, fmt in formats.items()}
    for said in evidence.values():
        said.against.append(f"judged on {len(sample.tensors)} of {len(names)} names, sampled across the file")
    candidates = [name for name, said in evidence.items() if said.score >= 1.0]
    evidence.update({name: formats[name].sniff(header) for name in candidates})
    if not any(evidence[name].score >= 1.0 for name in candidates):
        return {name: fmt.sniff(header) for name, fmt in formats.items()}
    return evidence


def complete(
    header: Header, evidence: dict[str, Evidence]
) -> tuple[list[Format], dict[str, tuple[ParsedFile, dict[str, Resolution]]]]:
    """The formats explaining every name and, when several, the parses and resolutions computed to
    break the tie (the formats whose parse fits exactly one family win)."""
    formats = registry.formats()
    found = [formats[name] for name, said in evidence.items() if said.score >= 1.0]
    refined = {fmt.refines for fmt in found}
    found = [fmt for fmt in found if fmt.name not in refined]  # a confirmed dialect beats its base
    work: dict[str, tuple[ParsedFile, dict[str, Resolution]]] = {}
    if len(found) > 1:
        families = registry.families()
        fitting = []
        for fmt in found:
            try:
                parsed = fmt.parsed(header)
            except LoraFormatsError:
                continue
            resolved = dict(zip(families, resolve_all(parsed, header, families.values()), strict=True))
            work[fmt.name] = (parsed, resolved)
            if not parsed.unsupported and sum(r.fits for r in resolved.values()) == 1:
                fitting.append(fmt)
        found = fitting or found
    return found, work


def mostly(evidence: dict[str, Evidence]) -> Format | None:
    """The one format that explains most names (at least half), as `convert` would read it."""
    ranked = sorted(((said.score, name) for name, said in evidence.items()), reverse=True)
    if ranked and ranked[0][0] >= 0.5 and (len(ranked) == 1 or ranked[1][0] < ranked[0][0]):
        return registry.formats()[ranked[0][1]]
    return None


def for_header(header: Header) -> FormatChoice:
    """The format of one safetensors header, parsed."""
    choice = FormatChoice(sniff_all(header))
    found, work = complete(header, choice.evidence)
    if len(found) > 1:
        choice.status = "ambiguous"
        choice.reasons.append("several formats explain every name: " + ", ".join(f.name for f in found))
        return choice
    fmt = found[0] if found else mostly(choice.evidence)
    if fmt is None:
        choice.reasons.append("no installed format explains every tensor name")
        return choice
    share = choice.evidence[fmt.name].score
    if not found:
        choice.reasons.append(f"{fmt.name} explains {share:.0%} of the names; the rest are unsupported")
    try:
        parsed, choice.resolutions = work.get(fmt.name) or (fmt.parsed(header), {})
    except LoraFormatsError as error:
        choice.reasons.append(f"{fmt.name}: {error.message}")
        return choice
    choice.choose(fmt, share, [(header, parsed)])
    return choice


def for_directory(path: Path, allow_pickle: bool) -> FormatChoice:
    """The directory format that claims `path` (e.g. PEFT), with the header and parse of each file."""
    choice = FormatChoice({name: fmt.sniff_path(path) for name, fmt in registry.formats().items()})
    fmt = mostly(choice.evidence)
    if fmt is None:
        choice.reasons.append("no installed directory format claims this directory")
        return choice
    context = ReadContext(families=registry.families(), allow_pickle=allow_pickle)
    try:
        parts = fmt.parts(path, context)
    except LoraFormatsError as error:
        choice.reasons.append(f"{fmt.name}: {error.message}")
        return choice
    choice.choose(fmt, choice.evidence[fmt.name].score, parts)
    return choice
