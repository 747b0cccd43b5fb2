"""Pickled checkpoints (.pt, .ckpt, .bin) are refused unless the user opts in.

With the opt-in, the file is loaded with `torch.load(weights_only=True)` (no arbitrary objects,
so no code runs) and re-written as a temporary safetensors file, so every later step is the same
validated path as for safetensors input.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidFileError, LoraFormatsError, UnsupportedError
from .header import Header, open_regular, read_header

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin"})


def pickled_by_name(path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def pickled_by_content(path: Path) -> bool:
    """A torch zip archive or a raw pickle (protocol 2-5). Ask only once safetensors parsing failed:
    a valid safetensors header length can start with the same bytes."""
    try:
        with open_regular(path) as handle:  # never open a FIFO blocking, nor read a device
            first = handle.read(4)
    except (OSError, LoraFormatsError):
        return False
    return first.startswith(b"PK\x03\x04") or (len(first) > 1 and first[0] == 0x80 and 2 <= first[1] <= 5)


def refuse(path: Path) -> UnsupportedError:
    return UnsupportedError(
        "pickled checkpoints are refused by default (unpickling can run code); pass --allow-pickle "
        "(allow_pickle=True) to load it with torch.load(weights_only=True)",
        path=path,
    )


def to_safetensors(path: Path) -> Path:
    """A temporary safetensors copy of a pickled state dict; the caller deletes it."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses any non-tensor object: report, never run it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InvalidFileError(
            f"not a plain tensor checkpoint (weights_only load failed: {first})", path=path
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise InvalidFileError("pickle does not hold a flat {name: tensor} state dict", path=path)
    fd, temp = tempfile.mkstemp(prefix="loraformats-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, temp)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


@contextmanager
def temporaries_removed(headers: Iterable) -> Iterator[None]:
    """Delete the temporary safetensors copies behind `headers` when the block ends, however it ends.

    Readers open their sources on temporary files at once (see `assemble`), so the bytes stay
    readable through the open descriptor after the file is gone."""
    headers = list(headers)
    try:
        yield
    finally:
        for header in headers:
            if getattr(header, "temporary", False):
                header.path.unlink(missing_ok=True)


def open_header(path: str | os.PathLike, *, allow_pickle: bool = False) -> Header:
    """The validated header of `path`; a pickle is refused, or (opted in) re-read as safetensors."""
    path = Path(path)
    if not path.is_file():
        return read_header(path)  # the usual one-line error for a missing path or a directory
    if not pickled_by_name(path):
        try:
            return read_header(path)
        except InvalidFileError:
            if not pickled_by_content(path):
                raise
    if not allow_pickle:
        raise refuse(path)
    header = read_header(to_safetensors(path))
    header.temporary, header.origin = True, path
    return header
