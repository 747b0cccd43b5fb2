"""Alpha values: the one piece of tensor data detection reads, and only when asked (`read_alphas`).

An alpha is a one-element tensor per module (Kohya), or a value the format keeps elsewhere (a
diffusers or PEFT config, via `Format.module_extras`), or absent; absent or zero means alpha = rank,
as every loader treats it.
"""

from __future__ import annotations

from collections.abc import Iterator

from .assemble import Match
from .errors import OutputError, UsageError
from .formats import Format
from .header import Header
from .tensors import FileTensor, SourceFile


def read_alphas_of(fmt: Format, parts: list[tuple[Header, list[Match]]]) -> Iterator[tuple[Match, str]]:
    """(match, alpha as text: `8`, `0.5`) for every matched module, reading each scalar alpha tensor."""
    for header, matches in parts:
        if not header.path.is_file():
            raise UsageError("read_alphas needs the file, not only its header", path=header.path)
        source = SourceFile(header.path)
        try:
            for match in matches:
                yield match, _text(_value(fmt, header, source, match))
        finally:
            source.close()


def _value(fmt: Format, header: Header, source: SourceFile, match: Match) -> float:
    roles = {role: FileTensor.named(source, header, name) for role, name in match.module.tensors.items()}
    alpha = roles.get("alpha")
    if alpha is None:
        alpha = fmt.module_extras(header, match.component, match.path, roles).get("alpha")
    try:
        value = alpha.scalar() if alpha is not None else 0.0
    except OSError as error:
        raise OutputError(f"cannot read an alpha tensor: {error.strerror}", path=header.path) from None
    if not value and "down" in roles:
        return float(roles["down"].shape[0])  # the rank
    return value


def _text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)
