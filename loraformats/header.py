"""Bounded, validated parsing of a safetensors header. Nothing here reads tensor data or imports torch.

Every check happens before any field is used, so a hostile file fails with a one-line
`InvalidFileError` instead of an exception deep inside a reader.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from math import prod
from operator import itemgetter, le, mul, sub
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from .errors import InvalidFileError, OutputError

#: Bytes per element of every dtype safetensors defines (sub-byte float types are not accepted).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

#: The safetensors library refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000

#: Shapes and offsets beyond int64 cannot be real and would overflow numpy and torch.
INT64_MAX = 2**63 - 1

NOT_REGULAR = "is not a regular file (a FIFO, socket or device)"

_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})
_FIELDS = itemgetter("dtype", "shape", "data_offsets")
_START, _END = itemgetter(2), itemgetter(3)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

_PICKLE_HINTS = {b"PK\x03\x04": "a zip archive (PyTorch's torch.save format)", b"\x80": "a Python pickle"}


class TensorInfo(NamedTuple):
    """Where one tensor's bytes are, relative to the start of the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    """A validated safetensors header: metadata and tensor locations, in file order."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int
    file_size: int = 0
    header_bytes: int = field(default=0, repr=False)
    #: True for a temporary file loraformats made (a pickle re-written as safetensors)...
    temporary: bool = field(default=False, repr=False)
    #: ...and then the path the user gave.
    origin: Path | None = field(default=None, repr=False)
    #: Format name -> its parse of this header (`Format.parsed`): detection sniffs, then parses.
    parses: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):  # rare: find the culprit the slow way
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidFileError(f"header names tensor {key!r} twice")
            seen.add(key)
    return result


def _not_safetensors_hint(first: bytes) -> str:
    for magic, what in _PICKLE_HINTS.items():
        if first.startswith(magic):
            return f"; it looks like {what} (pickled checkpoints need --allow-pickle)"
    return ""


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file without touching its data section."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        first = _read(f, 8, path)
        if len(first) < 8:
            raise InvalidFileError(f"file is {size} bytes, too short for a safetensors header", path=path)
        (n,) = struct.unpack("<Q", first)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            limit = "the 100 MB cap" if n > MAX_HEADER_BYTES else f"the file size ({size} bytes)"
            hint = _not_safetensors_hint(first)
            message = f"header length {n} exceeds {limit}: not a safetensors file{hint}"
            raise InvalidFileError(message, path=path)
        raw = _read(f, n, path)
        if len(raw) < n:
            raise InvalidFileError("file shrank while its header was read", path=path)
    try:
        return parse_header(raw, path=path, data_size=size - 8 - n)
    except InvalidFileError as error:
        if error.path is None:
            raise InvalidFileError(error.message, path=path) from None
        raise


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading, or fail with one line.

    The open is non-blocking and the type is checked on the open descriptor (no race with a
    rename): a FIFO would block forever, and /dev/zero or /dev/urandom never end.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise _open_error(error, path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise InvalidFileError("is a directory, not a safetensors file", path=path)
        raise InvalidFileError(NOT_REGULAR, path=path)
    return os.fdopen(fd, "rb", buffering=0)  # unbuffered: read the header and not a byte of tensor data


def _open_error(error: OSError, path: Path) -> InvalidFileError | OutputError:
    if isinstance(error, IsADirectoryError):
        return InvalidFileError("is a directory, not a safetensors file", path=path)
    if isinstance(error, FileNotFoundError):
        return InvalidFileError("no such file", path=path)
    if isinstance(error, PermissionError):
        return OutputError("permission denied while reading", path=path)
    if error.errno == errno.ENXIO:  # a socket
        return InvalidFileError(NOT_REGULAR, path=path)
    if error.errno in (errno.ELOOP, errno.ENAMETOOLONG, errno.ENOTDIR):
        return InvalidFileError(f"cannot open: {error.strerror}", path=path)
    return OutputError(f"cannot read: {error.strerror or error}", path=path)


def _read(f: BinaryIO, n: int, path: Path) -> bytes:
    """Up to `n` bytes, fewer only at the end of the file (an unbuffered read may return less)."""
    data = bytearray()
    try:
        while len(data) < n:
            chunk = f.read(n - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as error:
        raise OutputError(f"cannot read: {error.strerror or error}", path=path) from None
    return bytes(data)


def parse_header(raw: bytes, *, path: str | os.PathLike = "<header>", data_size: int | None = None) -> Header:
    """Validate header bytes. With `data_size`, offsets must tile the data section exactly."""
    try:
        doc = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_reject_duplicates, parse_constant=_no_constant
        )
    except UnicodeDecodeError:
        raise InvalidFileError("header is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise InvalidFileError(f"header is not valid JSON ({error.msg} at byte {error.pos})") from None
    except ValueError as error:  # e.g. an integer literal longer than Python's 4300-digit limit
        raise InvalidFileError(f"header is not valid JSON ({str(error).split(':')[0]})") from None
    except RecursionError:
        raise InvalidFileError("header JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidFileError("header JSON is not an object")
    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidFileError("__metadata__ must map strings to strings")
    _check_text([*metadata, *metadata.values()], "__metadata__")
    tensors = _tensor_infos(doc)
    if tensors is None:  # some entry is wrong: find it and say what, one entry at a time
        tensors = {name: _tensor_info(name, entry) for name, entry in doc.items()}
    _check_text(tensors, "tensor name")
    if not _tiles(tensors, data_size):
        _check_layout(tensors, data_size)
    return Header(
        path=Path(path),
        metadata=metadata,
        tensors=tensors,
        data_start=8 + len(raw),
        file_size=(8 + len(raw) + data_size) if data_size is not None else 0,
        header_bytes=len(raw),
    )


def _no_constant(name: str) -> None:
    raise InvalidFileError(f"header is not valid JSON ({name} is not a JSON number)")


def _check_text(strings: Iterable[str], what: str) -> None:
    """Strings must be real Unicode (no lone surrogates from `\\ud800` escapes): they are printed and
    re-encoded later. Tensor names must also be free of control characters, so that every message
    naming one stays on one line (metadata values may hold newlines)."""
    strings = list(strings)
    joined = "".join(strings)  # all at once first; the culprit is looked for only if there is one
    if joined.isascii() and (what != "tensor name" or joined.isprintable()):
        return  # ASCII encodes, and printable ASCII has no control characters
    try:
        joined.encode("utf-8")
        if what != "tensor name" or not _CONTROL.search(joined):
            return
    except UnicodeEncodeError:
        pass
    for text in strings:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidFileError(f"{what} {text!r} is not valid Unicode") from None
        if what == "tensor name" and _CONTROL.search(text):
            raise InvalidFileError(f"{what} {text!r} contains control characters")


def _tensor_infos(doc: dict[str, object]) -> dict[str, TensorInfo] | None:
    """Every entry checked at once, in C-level passes (a header may list thousands of tensors);
    None when any entry is wrong (or has a zero dimension), for `_tensor_info` to say which and why."""
    entries = list(doc.values())
    if not entries:
        return {}
    try:
        if set(map(len, entries)) != {3}:
            return None
        dtypes, shapes, offsets = zip(*map(_FIELDS, entries), strict=True)  # KeyError: a field missing
        if not set(dtypes) <= DTYPE_SIZES.keys() or {*map(type, shapes), *map(type, offsets)} != {list}:
            return None
        dims = list(chain.from_iterable(shapes))
        if set(map(type, dims)) - {int} or set(map(len, offsets)) != {2}:
            return None
        starts, ends = zip(*offsets, strict=True)
    except (TypeError, KeyError):  # an entry that is not an object, or an unhashable dtype
        return None
    if {*map(type, starts), *map(type, ends)} != {int} or min(starts) < 0 or max(ends) > INT64_MAX:
        return None
    if dims and (min(dims) <= 0 or max(dims) > INT64_MAX):
        return None  # zero dimensions are legal but rare: the slow path checks their other dimensions
    counts = list(map(prod, shapes))
    if max(counts) > INT64_MAX:
        return None
    if list(map(mul, counts, map(DTYPE_SIZES.__getitem__, dtypes))) != list(map(sub, ends, starts)):
        return None
    infos = map(
        partial(tuple.__new__, TensorInfo), zip(dtypes, map(tuple, shapes), starts, ends, strict=True)
    )
    return dict(zip(doc, infos, strict=True))


def _tiles(tensors: dict[str, TensorInfo], data_size: int | None) -> bool:
    """Whether the tensors sit end to end from byte 0 (and fill the data section, given its size):
    the layout of every file safetensors writes, checked at C speed. False leaves the reason to
    `_check_layout`, which also accepts gaps when the data size is unknown."""
    if not tensors:
        return data_size in (None, 0)
    starts, ends = list(map(_START, tensors.values())), list(map(_END, tensors.values()))
    if not all(map(le, starts, starts[1:])):  # in file order already, as safetensors writes them
        starts, ends = map(list, zip(*sorted(zip(starts, ends, strict=True)), strict=True))
    return starts[0] == 0 and starts[1:] == ends[:-1] and data_size in (None, ends[-1])


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or entry.keys() != _ENTRY_FIELDS:
        raise InvalidFileError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise InvalidFileError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= INT64_MAX for d in shape):
        raise InvalidFileError(f"tensor {name!r}: shape must list non-negative integers below 2**63")
    if prod(d for d in shape if d) > INT64_MAX:  # later numpy/torch code would overflow int64
        raise InvalidFileError(f"tensor {name!r}: shape {shape} has more than 2**63 elements")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= INT64_MAX
    ):
        raise InvalidFileError(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end")
    start, end = offsets
    expected = prod(shape) * DTYPE_SIZES[dtype]
    if end - start != expected:
        raise InvalidFileError(
            f"tensor {name!r}: {dtype}{shape} needs {expected} bytes but data_offsets span {end - start}"
        )
    return TensorInfo(dtype, tuple(shape), start, end)


def _check_layout(tensors: dict[str, TensorInfo], data_size: int | None) -> None:
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start < position:
            raise InvalidFileError(f"tensor {name!r} overlaps the tensor before it")
        if data_size is not None and info.start > position:
            raise InvalidFileError(f"data section has a gap of {info.start - position} bytes before {name!r}")
        position = info.end
    if data_size is not None and position != data_size:
        if position > data_size:
            raise InvalidFileError(
                f"tensor data ends at byte {position} but the data section has {data_size}"
            )
        raise InvalidFileError(f"data section has {data_size - position} trailing bytes no tensor claims")
