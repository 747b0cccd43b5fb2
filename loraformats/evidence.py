"""Why one family and not another: the shapes and names that decided, what leaves a tie open, and
what the file's metadata claims about its base model.

All of it works on resolutions (`assemble.resolve`) and module tables; nothing reads tensor data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .assemble import Resolution
from .detection_result import Candidate, Detection
from .families import Family, Layer
from .formats import Format
from .header import Header


def difference(a: Layer, b: Layer, name_a: str, name_b: str) -> str | None:
    """What tells two layers apart for an adapter, e.g. "input width 768 (sd1) vs 1024 (sd2)".

    A linear and a 1x1 conv of equal widths take the same factors, so that is no difference.
    """
    if a.in_features != b.in_features:
        return f"input width {a.in_features} ({name_a}) vs {b.in_features} ({name_b})"
    if a.out_features != b.out_features:
        return f"output width {a.out_features} ({name_a}) vs {b.out_features} ({name_b})"
    kernel_a = a.kernel if a.kind == "conv2d" else (1, 1)
    kernel_b = b.kernel if b.kind == "conv2d" else (1, 1)
    if kernel_a != kernel_b:
        return (
            f"kernel {'x'.join(map(str, kernel_a))} ({name_a}) vs {'x'.join(map(str, kernel_b))} ({name_b})"
        )
    return None


def decided_by_shape(winner: Resolution, other: Resolution) -> str | None:
    """The shapes that rule `other` out although it knows the names, e.g. for sd1 against sd2:
    "...attn2_to_k: input width 768 (sd1) vs 1024 (sd2)". None if names alone decided."""
    if not other.misfit_layers:
        return None
    fitted = winner.matches_of(other.misfit_layers)
    best = None
    for key, theirs in other.misfit_layers.items():
        match = fitted.get(key)
        if match is None:
            continue
        ours = match.component.modules[match.path]
        said = difference(ours, theirs, winner.family.name, other.family.name)
        if said and (best is None or said.startswith("input")):
            best = f"{key}: {said}"
            if said.startswith("input"):  # a context width is the clearest signal there is
                break
    return best


#: (id a, id b) -> (a, b, example); families live for the process, so this stays small.
_TELLING: dict[tuple[int, int], tuple[Family, Family, str | None]] = {}


def telling_module(a: Family, b: Family) -> str | None:
    """A module both families have, whose shapes tell them apart (widths first), e.g. "unet
    down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k: input width 768 (sd1) vs 2048 (sdxl)"."""
    cached = _TELLING.get((id(a), id(b)))
    if cached and cached[0] is a and cached[1] is b:
        return cached[2]
    found = None
    for name, component in a.components.items():
        theirs = b.components.get(name)
        if theirs is None:
            continue
        for path, layer in component.modules.items():
            other = theirs.modules.get(path)
            if other is None or layer.kind == "norm":
                continue
            said = difference(layer, other, a.name, b.name)
            if said and (found is None or said.startswith("input")):
                found = f"{name} {path}: {said}"
                if said.startswith("input"):
                    break
        if found and "input width" in found:
            break
    _TELLING[(id(a), id(b))] = (a, b, found)
    return found


def ambiguity(fitting: list[Resolution]) -> str:
    """Why several families fit: every module has the same name and shape in each, and the modules
    that would tell them apart are not in the file."""
    names = [r.family.name for r in fitting]
    text = f"every module has the same name and shape in {', '.join(names)}"
    first = fitting[0].family
    examples = [telling_module(first, r.family) for r in fitting[1:]]
    examples = [e for e in examples if e]
    if examples:
        text += "; modules that would tell them apart are absent, e.g. " + "; ".join(examples)
    return text


@dataclass
class Claim:
    """A metadata entry naming a base model, and the installed families that answer to it."""

    key: str
    value: str
    families: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.key}={self.value}"


def describe(formats: list[Format], headers: list[Header]) -> tuple[dict[str, str], list[Claim]]:
    """Every format's summary of the metadata (first format to say a key wins) and the base-model
    claims among it. Formats that did not recognise the tensors may still know the metadata."""
    summary: dict[str, str] = {}
    claims: dict[str, Claim] = {}
    for header in headers:
        for fmt in formats:
            said = fmt.describe(header)
            for key, value in said.items():
                summary.setdefault(key, value)
            for key in fmt.base_model_keys:
                if key in said and key not in claims:
                    claims[key] = Claim(key, said[key])
    return summary, list(claims.values())


def claimed_families(claims: list[Claim], families: dict[str, Family]) -> list[Claim]:
    """Fill each claim with the families whose aliases it names."""
    for claim in claims:
        claim.families = [name for name, family in families.items() if family.claimed_by(claim.value)]
    return claims


# ------------------------------------------------------------------------------------------ in a result


def score_families(
    result: Detection, resolutions: dict[str, Resolution], fitting: list[Resolution]
) -> list[str]:
    """Every family's share of modules, what fitted, and which names or shapes ruled the others out
    (returned when one family fits)."""
    winner = fitting[0] if len(fitting) == 1 else None
    candidates: dict[str, Candidate] = {}
    ruled_out: list[str] = []
    for name, resolution in resolutions.items():
        total = resolution.modules or 1
        modules = "sampled modules" if resolution.sampled else "modules"
        candidate = candidates[name] = Candidate(name=name, score=round(resolution.matched / total, 4))
        if resolution.matched:
            candidate.reasons.append(f"{resolution.matched} of {total} {modules} fit by name and shape")
        if resolution.sampled:
            candidate.against.append(f"ruled out by {total} modules sampled across the file")
        if resolution.unknown:
            candidate.against.append(
                f"{len(resolution.unknown)} {modules[:-1]} names unknown, e.g. {resolution.unknown[0]}"
            )
        if winner is None or resolution is winner:
            if resolution.misfit:
                candidate.against.append(
                    f"{len(resolution.misfit)} shapes do not fit, e.g. {resolution.misfit[0]}"
                )
            continue
        shown = decided_by_shape(winner, resolution)
        if resolution.misfit:
            example = shown or resolution.misfit[0]
            candidate.against.append(f"{len(resolution.misfit)} shapes do not fit, e.g. {example}")
        if shown:
            ruled_out.append(f"not {name}: {shown}")
        elif resolution.unknown:
            unknown = (
                f"{len(resolution.unknown)} of {total} sampled"
                if resolution.sampled
                else len(resolution.unknown)
            )
            ruled_out.append(f"not {name}: {unknown} module names it does not have")
    if winner is not None:
        candidates[winner.family.name].reasons += ruled_out
    result.families = sorted(candidates.values(), key=lambda c: -c.score)
    return ruled_out


def report_claims(
    result: Detection, claims: list[Claim], resolutions: dict[str, Resolution], fitting: list[Resolution]
) -> None:
    """Metadata naming a base model: support, a hint when the tensors tie, a contradiction otherwise."""
    fits = {r.family.name for r in fitting}
    by_name = {c.name: c for c in result.families}
    for claim in claims:
        if not claim.families:
            result.reasons.append(f"metadata {claim}: no installed family answers to it")
            continue
        for name, candidate in by_name.items():
            if name in claim.families:
                target = candidate.reasons if name in fits else candidate.against
                target.append(f"metadata {claim} names {name}")
            elif name in fits:
                candidate.against.append(f"metadata {claim} names {', '.join(claim.families)}")
        agreeing = [name for name in claim.families if name in fits]
        if len(fits) > 1 and agreeing:
            result.reasons.append(
                f"metadata {claim} suggests {', '.join(agreeing)}; the tensors cannot tell "
                "(--family chooses one)"
            )
        elif not agreeing and resolutions:
            named = ", ".join(claim.families)
            found = ", ".join(sorted(fits)) or "no installed family"
            detail = ""
            if len(fitting) == 1:
                detail = next(
                    (f" ({s})" for n in claim.families if n in resolutions
                     if (s := decided_by_shape(fitting[0], resolutions[n]))),
                    "",
                )  # fmt: skip
            result.contradictions.append(f"{claim} names {named}, but the tensors fit {found}{detail}")
            result.reasons.append(f"contradiction: {result.contradictions[-1]}")  # for text reports
        elif not agreeing:
            result.reasons.append(f"metadata {claim} names {', '.join(claim.families)}")
