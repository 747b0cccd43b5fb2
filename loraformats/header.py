"""Bounded, validated parsing of a safetensors header. Nothing here reads tensor data or imports torch.

Every check happens before any field is used, so a hostile file fails with a one-line
`InvalidFileError` instead of an exception deep inside a reader.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import NamedTuple

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
    #: True for a temporary file loraformats made (a pickle re-written as safetensors).
    temporary: bool = field(default=False, repr=False)


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidFileError(f"header names tensor {key!r} twice")
        seen[key] = value
    return seen


def _not_safetensors_hint(first: bytes) -> str:
    for magic, what in _PICKLE_HINTS.items():
        if first.startswith(magic):
            return f"; it looks like {what} (pickled checkpoints need --allow-pickle)"
    return ""


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate the header of a safetensors file without touching its data section."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            if len(first) < 8:
                raise InvalidFileError(f"file is {size} bytes, too short for a safetensors header", path=path)
            (n,) = struct.unpack("<Q", first)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                limit = "the 100 MB cap" if n > MAX_HEADER_BYTES else f"the file size ({size} bytes)"
                hint = _not_safetensors_hint(first)
                message = f"header length {n} exceeds {limit}: not a safetensors file{hint}"
                raise InvalidFileError(message, path=path)
            raw = f.read(n)
    except IsADirectoryError:
        raise InvalidFileError("is a directory, not a safetensors file", path=path) from None
    except FileNotFoundError:
        raise InvalidFileError("no such file", path=path) from None
    except PermissionError:
        raise OutputError("permission denied while reading", path=path) from None
    try:
        return parse_header(raw, path=path, data_size=size - 8 - n)
    except InvalidFileError as error:
        if error.path is None:
            raise InvalidFileError(error.message, path=path) from None
        raise


def parse_header(raw: bytes, *, path: str | os.PathLike = "<header>", data_size: int | None = None) -> Header:
    """Validate header bytes. With `data_size`, offsets must tile the data section exactly."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError:
        raise InvalidFileError("header is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise InvalidFileError(f"header is not valid JSON ({error.msg} at byte {error.pos})") from None
    if not isinstance(doc, dict):
        raise InvalidFileError("header JSON is not an object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidFileError("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _tensor_info(name, entry)
    _check_layout(tensors, data_size)
    return Header(
        path=Path(path),
        metadata=metadata,
        tensors=tensors,
        data_start=8 + len(raw),
        file_size=(8 + len(raw) + data_size) if data_size is not None else 0,
        header_bytes=len(raw),
    )


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidFileError(f"tensor {name!r}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise InvalidFileError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidFileError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
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
