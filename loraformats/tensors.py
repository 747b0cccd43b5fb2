"""Lazy tensor handles: a dtype, a shape and a way to produce the bytes.

Renames and reshapes never touch data; a `FileTensor`'s bytes are copied by the kernel from its
source file when written (`buffers` for the writer's `writev`, else `copy_file_range`). Only
`ComputedTensor` (real maths) imports torch.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from .header import DTYPE_SIZES

if TYPE_CHECKING:
    import torch

    from .header import Header

_CHUNK = 64 << 20
_COMPARE = 1 << 16
_BAND = 256 << 10  # bytes of a block diagonal built at a time: cache-sized
#: madvise(MADV_POPULATE_READ), Linux 5.14+ (Python 3.11 does not name it).
_POPULATE = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)

_SCALAR_FORMATS = {
    "F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h",
    "I8": "<b", "U8": "<B", "U16": "<H", "U32": "<I", "U64": "<Q", "BOOL": "<?",
}  # fmt: skip


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }[name]  # fmt: skip


def dtype_name(dtype: torch.dtype) -> str:
    import torch

    names = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }  # fmt: skip
    return names[dtype]


class TensorData(ABC):
    """Bytes-to-be of one tensor. Subclasses differ in where the bytes come from."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_SIZES[self.dtype]

    @abstractmethod
    def read_bytes(self) -> bytes: ...

    def write_to(self, fd: int) -> None:
        _write_all(fd, self.read_bytes())

    def buffers(self) -> list[memoryview] | None:
        """The bytes as buffers to hand to `writev` as they are, in order: mapped ranges of input
        files or bytes already in memory. None if they must be produced (`write_to` then writes)."""
        return None

    def reshaped(self, shape: tuple[int, ...]) -> TensorData:
        """The same bytes under another shape (no copy, byte-identical)."""
        if prod(shape) != prod(self.shape):
            raise ValueError(f"cannot reshape {self.shape} to {shape}")
        return ReshapedTensor(self, tuple(shape))

    def to_torch(self) -> torch.Tensor:
        import torch

        data = self.read_bytes()
        if not data:
            return torch.empty(self.shape, dtype=torch_dtype(self.dtype))
        return torch.frombuffer(bytearray(data), dtype=torch_dtype(self.dtype)).reshape(self.shape)

    def scalar(self) -> float:
        """The value of a one-element tensor, decoded without torch."""
        if prod(self.shape) != 1:
            raise ValueError(f"expected one element, got shape {self.shape}")
        data = self.read_bytes()
        if self.dtype == "BF16":
            return struct.unpack("<f", b"\x00\x00" + data)[0]
        return float(struct.unpack(_SCALAR_FORMATS[self.dtype], data)[0])

    def read_into(self, buffer: memoryview) -> int:
        """Put the bytes at the start of `buffer` (reused by callers: no fresh pages per tensor);
        returns how many there were, fewer only if a source ended early."""
        data = self.read_bytes()
        buffer[: len(data)] = data
        return len(data)

    def chunks(self, buffer: bytearray) -> Iterator[memoryview]:
        """The bytes in pieces of at most `len(buffer)`; file tensors read into `buffer`, so a piece
        is valid until the next. A source that ends early yields fewer bytes, never an error."""
        data = memoryview(self.read_bytes())
        for start in range(0, len(data), len(buffer)):
            yield data[start : start + len(buffer)]

    def rows(self, start: int, stop: int) -> TensorData:
        """Rows [start, stop) of the first axis (row-major, so a byte range of the tensor)."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of a tensor with {self.shape[0]} rows")
        if (start, stop) == (0, self.shape[0]):
            return self
        return RowsTensor(self, start, stop)

    def same_bytes(self, other: TensorData) -> bool:
        if other is self:
            return True
        return (
            self.dtype == other.dtype
            and self.shape == other.shape
            and self.read_bytes() == other.read_bytes()
        )


class SourceFile:
    """An input file opened once for reading; tensors refer to it by absolute byte offset."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._mapped: memoryview | None = None
        self._mappable = True

    @property
    def fd(self) -> int:
        return self.open()

    def open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def mapped(self, offset: int, length: int) -> memoryview | None:
        """Bytes [offset, offset + length) of a read-only map of the file, paged in (for `writev`,
        which lets the kernel read them), or None if the file cannot be mapped or is shorter now.
        Python code must never read the view: a file truncated meanwhile would raise SIGBUS."""
        if self._mapped is None:
            if not self._mappable:
                return None
            try:
                self._map = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
            except (OSError, ValueError):  # empty, a FIFO or device, a filesystem without mmap
                self._mappable = False
                return None
            self._mapped = memoryview(self._map)
        if offset + length > len(self._mapped):
            return None
        if _POPULATE is not None and length:  # map the pages now, in one call, not fault by fault
            start = offset - offset % mmap.PAGESIZE
            with contextlib.suppress(OSError):  # an older kernel: pages fault in during the write
                self._map.madvise(_POPULATE, start, offset + length - start)  # type: ignore[union-attr]
        return self._mapped[offset : offset + length]

    def close(self) -> None:
        if self._mapped is not None:
            self._mapped.release()  # slices handed out must be gone by now (see `mapped`)
            self._mapped = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a slice still lives: the map closes with it
                self._map.close()
            self._map = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()


class FileTensor(TensorData):
    """A tensor whose bytes sit at [offset, offset + nbytes) of a source file."""

    def __init__(self, source: SourceFile, offset: int, dtype: str, shape: tuple[int, ...]) -> None:
        self.source, self.offset, self.dtype, self.shape = source, offset, dtype, tuple(shape)

    @classmethod
    def named(cls, source: SourceFile, header: Header, name: str) -> FileTensor:
        """Tensor `name` of a validated `header`, whose file `source` has open."""
        info = header.tensors[name]
        return cls(source, header.data_start + info.start, info.dtype, info.shape)

    def read_bytes(self) -> bytes:
        return os.pread(self.source.fd, self.nbytes, self.offset) if self.nbytes else b""

    def read_into(self, buffer: memoryview) -> int:
        done = 0
        while done < self.nbytes:
            got = os.preadv(self.source.fd, [buffer[done : self.nbytes]], self.offset + done)
            if got <= 0:
                break
            done += got
        return done

    def chunks(self, buffer: bytearray) -> Iterator[memoryview]:
        done = 0
        while done < self.nbytes:
            want = min(len(buffer), self.nbytes - done)
            got = os.preadv(self.source.fd, [memoryview(buffer)[:want]], self.offset + done)
            if got <= 0:
                return
            yield memoryview(buffer)[:got]
            done += got

    def buffers(self) -> list[memoryview] | None:
        view = self.source.mapped(self.offset, self.nbytes)
        return None if view is None else [view]

    def write_to(self, fd: int) -> None:
        remaining, offset = self.nbytes, self.offset
        while remaining:
            try:
                copied = os.copy_file_range(self.source.fd, fd, min(remaining, _CHUNK), offset)
            except (OSError, AttributeError):
                copied = 0
            if copied <= 0:  # not supported here (or EOF): fall back to read + write
                _write_all(fd, os.pread(self.source.fd, remaining, offset))
                return
            remaining -= copied
            offset += copied

    def rows(self, start: int, stop: int) -> TensorData:
        """Rows [start, stop) of the first axis: still a contiguous byte range of the file."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of a tensor with {self.shape[0]} rows")
        row_bytes = self.nbytes // self.shape[0] if self.shape[0] else 0
        return FileTensor(
            self.source, self.offset + start * row_bytes, self.dtype, (stop - start, *self.shape[1:])
        )

    def same_bytes(self, other: TensorData) -> bool:
        if not isinstance(other, FileTensor) or (other.dtype, other.shape) != (self.dtype, self.shape):
            return super().same_bytes(other)
        if other.source is self.source and other.offset == self.offset:
            return True
        size = min(_COMPARE, self.nbytes)
        mine, theirs = bytearray(size), bytearray(size)
        # piece by piece: different factors usually differ in their first bytes. The buffers are
        # compared, not the pieces: memoryview equality goes item by item, some 50x slower.
        for a, b in zip(self.chunks(mine), other.chunks(theirs), strict=False):
            if len(a) != len(b) or (mine != theirs if len(a) == size else a.tobytes() != b.tobytes()):
                return False
        return True


class RowsTensor(TensorData):
    """Rows [start, stop) of another tensor (file tensors slice their byte range instead)."""

    def __init__(self, base: TensorData, start: int, stop: int) -> None:
        self.base, self.start, self.stop = base, start, stop
        self.dtype, self.shape = base.dtype, (stop - start, *base.shape[1:])

    def read_bytes(self) -> bytes:
        row_bytes = self.base.nbytes // self.base.shape[0]
        return self.base.read_bytes()[self.start * row_bytes : self.stop * row_bytes]


class ConcatRows(TensorData):
    """Tensors of one dtype and trailing shape stacked along the first axis; written part by part."""

    def __init__(self, parts: list[TensorData]) -> None:
        first = parts[0]
        if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
            raise ValueError("stacked tensors must share dtype and trailing shape")
        self.parts, self.dtype = parts, first.dtype
        self.shape = (sum(p.shape[0] for p in parts), *first.shape[1:])

    def read_bytes(self) -> bytes:
        return b"".join(part.read_bytes() for part in self.parts)

    def write_to(self, fd: int) -> None:
        for part in self.parts:
            part.write_to(fd)

    def buffers(self) -> list[memoryview] | None:
        views = []
        for part in self.parts:
            more = part.buffers()
            if more is None:
                return None
            views += more
        return views


class Zeros(TensorData):
    """A tensor of zeros (every dtype encodes zero as zero bytes), written without allocating it whole."""

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, tuple(shape)

    def read_bytes(self) -> bytes:
        return bytes(self.nbytes)

    def write_to(self, fd: int) -> None:
        remaining = self.nbytes
        while remaining:
            size = min(remaining, _CHUNK)
            _write_all(fd, bytes(size))
            remaining -= size


class BlockDiagonal(TensorData):
    """Matrices (rows_i, cols_i) placed on the diagonal of a zero matrix (sum rows, sum cols):
    the up factor of LoRAs fused at their summed rank. Trailing singleton axes (1x1 conv ups) kept."""

    def __init__(self, blocks: list[TensorData]) -> None:
        first = blocks[0]
        if any(b.dtype != first.dtype or b.shape[2:] != first.shape[2:] for b in blocks):
            raise ValueError("diagonal blocks must share dtype and trailing shape")
        if prod(first.shape[2:]) != 1:
            raise ValueError("only matrices (or 1x1 kernels) can be placed on a diagonal")
        self.blocks, self.dtype = blocks, first.dtype
        self.shape = (sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks), *first.shape[2:])

    def read_bytes(self) -> bytes:
        return b"".join(bytes(rows) for rows in self._row_bands())

    def write_to(self, fd: int) -> None:
        for rows in self._row_bands():  # one block's rows at a time, from one reused buffer
            _write_all(fd, rows)

    def _row_bands(self) -> Iterator[memoryview]:
        """The rows in turn, about 256 KiB at a time so that every pass stays in the cache: each
        block fills the columns of a zeroed buffer of its own, whose other columns stay zero."""
        import numpy as np

        item = DTYPE_SIZES[self.dtype]
        width = self.shape[1] * item
        step = max(1, _BAND // width)  # rows per piece
        col = 0
        for block in map(_row_readable, self.blocks):
            rows, cols = block.shape[0], block.shape[1] * item
            band = np.zeros((min(step, rows), width), dtype=np.uint8)
            scratch = memoryview(bytearray(min(step, rows) * cols))
            for start in range(0, rows, step):
                count = min(step, rows - start)
                if block.rows(start, start + count).read_into(scratch) != count * cols:
                    raise ValueError(f"a {block.dtype}{list(block.shape)} block ended early")
                values = np.frombuffer(scratch, np.uint8, count * cols).reshape(count, cols)
                band[:count, col : col + cols] = values
                yield memoryview(band[:count]).cast("B")
            col += cols


def _row_readable(tensor: TensorData) -> TensorData:
    """`tensor` if a range of its rows reads only those bytes (a file range, bytes in memory), else
    its bytes produced once (a computed tensor would be recomputed for every range)."""
    if isinstance(tensor, (FileTensor, MemoryTensor)):
        return tensor
    return MemoryTensor(tensor.read_bytes(), tensor.dtype, tensor.shape)


class ReshapedTensor(TensorData):
    def __init__(self, base: TensorData, shape: tuple[int, ...]) -> None:
        self.base, self.dtype, self.shape = base, base.dtype, shape

    def read_bytes(self) -> bytes:
        return self.base.read_bytes()

    def write_to(self, fd: int) -> None:
        self.base.write_to(fd)

    def buffers(self) -> list[memoryview] | None:
        return self.base.buffers()


class MemoryTensor(TensorData):
    """Bytes held in memory: small tensors (alphas) and materialised results."""

    def __init__(self, data: bytes, dtype: str, shape: tuple[int, ...]) -> None:
        self.data, self.dtype, self.shape = data, dtype, tuple(shape)
        if len(data) != self.nbytes:
            raise ValueError(f"{dtype}{list(shape)} needs {self.nbytes} bytes, got {len(data)}")

    def read_bytes(self) -> bytes:
        return self.data

    def buffers(self) -> list[memoryview]:
        return [memoryview(self.data)]

    @classmethod
    def f32(cls, value: float) -> MemoryTensor:
        """A float32 scalar (an alpha), rounded to nearest, without torch."""
        return cls(struct.pack("<f", value), "F32", ())

    @classmethod
    def from_torch(cls, tensor: torch.Tensor) -> MemoryTensor:
        return cls(torch_bytes(tensor), dtype_name(tensor.dtype), tuple(tensor.shape))


class ComputedTensor(TensorData):
    """A tensor produced by real maths when (and only when) its bytes are needed."""

    def __init__(self, compute: Callable[[], torch.Tensor], dtype: str, shape: tuple[int, ...]) -> None:
        self.compute, self.dtype, self.shape = compute, dtype, tuple(shape)

    def read_bytes(self) -> bytes:
        tensor = self.compute()
        if dtype_name(tensor.dtype) != self.dtype or tuple(tensor.shape) != self.shape:
            raise AssertionError(
                f"computed {tensor.dtype}{tuple(tensor.shape)}, declared {self.dtype}{self.shape}"
            )
        return torch_bytes(tensor)


def torch_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(__import__("torch").uint8).numpy().tobytes()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
