"""Streaming, atomic safetensors writer.

The header is written first, then each tensor in order straight from its source (byte ranges
are copied kernel-side), into a temporary file in the destination directory that is renamed
over the destination only once complete and synced. On any failure nothing is left behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import OutputError, UsageError
from .tensors import TensorData


def build_header(tensors: Sequence[tuple[str, TensorData]], metadata: dict[str, str]) -> bytes:
    """The header bytes (length prefix excluded), padded with spaces to a multiple of 8."""
    doc: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors:
        if name in doc:
            raise AssertionError(f"duplicate output tensor {name!r}")
        size = tensor.nbytes
        doc[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def refuse_overwriting_inputs(dest: Path, inputs: Iterable[Path]) -> None:
    """Never write over a file we are reading, even with --force."""
    target = dest.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or (target.exists() and source.exists() and os.path.samefile(target, source)):
            raise UsageError("output would overwrite the input; choose another output path", path=dest)
        if source.is_dir() and source in target.parents:
            raise UsageError("output would be written inside the input directory", path=dest)


def write_safetensors(
    dest: str | os.PathLike,
    tensors: Sequence[tuple[str, TensorData]],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
) -> int:
    """Write atomically; returns the number of bytes written."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise UsageError("output exists; pass --force to replace it", path=dest)
    if dest.is_dir():
        raise UsageError("output is a directory; give a file path", path=dest)
    header = build_header(tensors, metadata)
    directory = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{dest.name}.", suffix=".partial")
    except OSError as error:
        raise OutputError(f"cannot create a file in {directory}: {error.strerror}", path=dest) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        os.write(fd, len(header).to_bytes(8, "little"))
        os.write(fd, header)
        for _, tensor in tensors:
            tensor.write_to(fd)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, dest)
        _sync_directory(directory)
    except BaseException as error:
        if fd >= 0:
            os.close(fd)
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"writing failed: {error.strerror or error}", path=dest) from None
        raise
    return 8 + len(header) + sum(t.nbytes for _, t in tensors)


def _sync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
