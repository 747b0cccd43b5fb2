"""`inspect`: a readable report of a LoRA from its header alone (modules by block, metadata, size).

Like `detect`, it reads only the header: alpha values are tensor data, so the alpha column shows
what the file states elsewhere only when asked (`read_alphas=True` reads the scalar alpha
tensors); the metadata section shows what trainers recorded (e.g. `ss_network_alpha`).
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from math import prod

from pydantic import Field

from .deferred import DeferredModel
from .detection import Detection, ModuleGroup, detect_headers
from .header import Header
from .plugins import registry

WIDTH = 80
MAX_KEY = 48  # metadata keys up to this long share their line with the value


class Size(DeferredModel):
    """Where the bytes are: the header, and the tensor data by dtype."""

    file_bytes: int | None = Field(None, description="the file (all files of a directory); None for bytes")
    header_bytes: int
    data_bytes: int
    parameters: int = Field(description="number of tensor elements")
    dtypes: dict[str, int] = Field(description="dtype -> bytes of tensor data")


class Inspection(DeferredModel):
    schema_version: int = 1
    detection: Detection
    size: Size | None = None


def inspect(
    source: str | os.PathLike | Header | bytes, *, allow_pickle: bool = False, read_alphas: bool = False
) -> Inspection:
    """Detect, then account for sizes, from the header(s) alone (see the module docstring)."""
    result, headers = detect_headers(source, read_alphas=read_alphas, allow_pickle=allow_pickle)
    return Inspection(detection=result, size=size(headers) if headers else None)


def size(headers: list[Header]) -> Size:
    dtypes: dict[str, int] = {}
    parameters = 0
    for header in headers:
        for info in header.tensors.values():
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.nbytes
            parameters += prod(info.shape)
    files = [h.file_size for h in headers]
    return Size(
        file_bytes=sum(files) if all(files) else None,
        header_bytes=sum(h.header_bytes + 8 for h in headers),
        data_bytes=sum(dtypes.values()),
        parameters=parameters,
        dtypes=dict(sorted(dtypes.items())),
    )


# ------------------------------------------------------------------------------------------ text


def render(report: Inspection, width: int = WIDTH) -> str:
    """The report as text no wider than `width` columns."""
    result = report.detection
    lines = [_clip(result.path, width)]
    lines += _identity(result, width)
    if report.size:
        lines.append(_field("size", _size_text(report.size, result.tensors), width))
    if result.groups:
        lines += ["", *_modules(result, width)]
    lines += ["", *_metadata(result, width)]
    reasons = [r for r in result.reasons if not r.startswith("contradiction: ")]  # listed below
    lines += ["", "why:"] + [line for reason in reasons for line in _bullet(reason, width)]
    if result.contradictions:
        lines += ["", "contradictions (the tensors win):"]
        lines += [line for text in result.contradictions for line in _bullet(text, width)]
    return "\n".join(lines)


def _identity(result: Detection, width: int) -> list[str]:
    formats, families = registry.formats(), registry.families()
    fmt = f"{result.format} ({formats[result.format].label})" if result.format in formats else result.format
    family = result.family
    if family in families:
        family = f"{family} ({families[family].label})"
    elif family == "ambiguous":
        tied = [c.name for c in result.families if c.score == 1.0 and not c.against]
        family = f"ambiguous: {', '.join(tied)}" if tied else family
    lines = [
        _field("format", fmt, width),
        _field("family", f"{family}; confidence {result.confidence:.2f}", width),
    ]
    if result.releases:
        shown = ", ".join(result.releases)
        lines.append(_field("release", f"ambiguous: {shown}" if len(result.releases) > 1 else shown, width))
    if result.variant:
        lines.append(_field("naming", result.variant, width))
    if result.algorithms:
        lines.append(_field("algorithms", ", ".join(result.algorithms), width))
    return lines


def _size_text(size: Size, tensors: int) -> str:
    dtypes = ", ".join(f"{dtype} {_bytes(n)}" for dtype, n in size.dtypes.items())
    whole = f"{_bytes(size.file_bytes)}; " if size.file_bytes else ""
    header = _bytes(size.header_bytes)
    return f"{whole}{tensors} tensors, {_count(size.parameters)} params ({dtypes}); header {header}"


HEAD = f"  {'block':<32}{'modules':>7}  {'rank':<6}{'alpha':<6}{'dtype':<6}algorithm"


def _modules(result: Detection, width: int) -> list[str]:
    counts = ", ".join(f"{c.name} {c.modules}" for c in result.components)
    total = sum(c.modules for c in result.components)
    lines = [_clip(f"modules: {total} ({counts})", width), HEAD[:width]]
    component = None
    for row in _fold([_row(group) for group in result.groups]):
        if row.component != component:
            component = row.component
            lines.append(f"  {component}")
        algorithm = row.algorithm + (f" ({row.convs} conv)" if row.convs else "")
        text = (
            f"    {_clip(row.label, 30):<30}{row.modules:>7}  {row.ranks:<6}{row.alphas:<6}{row.dtypes:<6}"
            f"{algorithm}"
        )
        lines.append(_clip(text, width))
    if not result.alphas:
        lines.append(_clip("  alpha: tensor data, not read (read_alphas=True reads it)", width))
    return lines


@dataclass
class _Row:
    """One printed line of the module table: a block, or a run of alike numbered blocks."""

    component: str
    label: str
    modules: int
    ranks: str
    alphas: str
    dtypes: str
    algorithm: str
    convs: int
    per_block: int = 0

    def shown(self) -> tuple:
        return (self.component, self.per_block, self.ranks, self.alphas, self.dtypes, self.algorithm)


def _row(group: ModuleGroup) -> _Row:
    return _Row(
        group.component,
        group.block,
        group.modules,
        _spread(group.ranks),
        _spread(group.alphas) or "-",
        "/".join(group.dtypes),
        ", ".join(group.algorithms),
        group.kinds.get("conv2d", 0),
        group.modules,
    )


def _fold(rows: list[_Row]) -> list[_Row]:
    """Consecutive numbered blocks that print alike become one line (`text_model.encoder.layers.0-11`);
    the JSON keeps every block."""
    folded: list[tuple[_Row, str, int, int]] = []  # (row, stem, first index, last index)
    for row in rows:
        stem, _, index = row.label.rpartition(".")
        if folded and index.isdigit():
            last, last_stem, first, end = folded[-1]
            if last_stem == stem and int(index) == end + 1 and last.shown() == row.shown():
                last.modules += row.modules
                last.convs += row.convs
                folded[-1] = (last, stem, first, end + 1)
                continue
        numbered = index.isdigit()
        folded.append((row, stem, int(index), int(index)) if numbered else (row, row.label, -1, -1))
    for row, stem, first, last in folded:
        if last > first:
            row.label = f"{stem}.{first}-{last}"
    return [row for row, *_ in folded]


def _metadata(result: Detection, width: int) -> list[str]:
    if not result.metadata_keys:
        return ["metadata: none"]
    lines = [f"metadata: {result.metadata_keys} entries; what the formats make of them:"]
    if not result.metadata:
        return [*lines[:-1], f"metadata: {result.metadata_keys} entries, none a format knows"]
    entries = dict(result.metadata)
    first = {k: entries.pop(k) for k in ("trigger_words",) if k in entries}
    column = min(max(len(key) for key in result.metadata), MAX_KEY) + 2
    for key, value in {**first, **entries}.items():
        value = " ".join(value.split())
        if len(key) > MAX_KEY:  # a very long key gets its own line
            lines += [_clip(f"  {key}", width), _clip(f"  {'':<{column}}{value}", width)]
        else:
            lines.append(_clip(f"  {key:<{column}}{value}", width))
    return lines


# ------------------------------------------------------------------------------------------ formatting


def _field(name: str, value: str, width: int) -> str:
    return _clip(f"  {name:<11}{value}", width)


def _bullet(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, initial_indent="  - ", subsequent_indent="    ", break_long_words=True)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _spread(counts: dict[str, int]) -> str:
    """One value, or the range of several: `4`, `2-16` (the JSON has every count)."""
    if not counts:
        return ""
    if len(counts) == 1:
        return next(iter(counts))
    try:
        values = sorted(counts, key=float)
    except ValueError:
        return "mixed"
    return f"{values[0]}-{values[-1]}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
