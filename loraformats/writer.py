"""Streaming, atomic safetensors writer.

The header is written first, then each tensor in order straight from its source, into a
temporary file in the destination directory that is renamed over the destination only once
complete and synced. On any failure nothing is left behind.

Byte ranges of the inputs (from read-only maps) and small tensors held in memory (alphas) are
gathered with `writev`, up to IOV_MAX buffers or 64 MiB per call: the kernel copies them, and a file
of thousands of tensors takes a few dozen system calls, so the copy seldom waits for the GIL while
the NaN/Inf scan runs beside it. Other tensors (computed, zeros, block diagonals) write themselves
in between.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .errors import InvalidFileError, OutputError, UsageError
from .tensors import TensorData, _write_all

_CHANGED = "an input file changed while it was being read; nothing was written"


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
    """Never write over a file we are reading, even with --force; fail early on an unusable path."""
    try:
        os.lstat(dest)
    except FileNotFoundError:
        pass
    except OSError as error:  # a name too long, a file used as a directory: every later stat would fail
        raise OutputError(f"cannot write there: {error.strerror}", path=dest) from None
    target = _resolved(dest)
    for source in inputs:
        source = _resolved(Path(source))
        if target == source or _same_file(target, source):
            raise UsageError("output would overwrite the input; choose another output path", path=dest)
        if os.path.isdir(source) and source in target.parents:
            raise UsageError("output would be written inside the input directory", path=dest)
        if target in source.parents:  # --force on a directory output deletes what it held
            raise UsageError("output would replace the directory that holds the input", path=dest)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing or unreadable: then they are not one file we read
        return False


def _resolved(path: Path) -> Path:
    """The real path; a symlink loop cannot be resolved, but then it cannot be read (nor be the
    input) either, so its absolute spelling is enough to compare."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 on a symlink loop
        return Path(os.path.abspath(path))


def write_safetensors(
    dest: str | os.PathLike,
    tensors: Sequence[tuple[str, TensorData]],
    metadata: dict[str, str],
    *,
    overwrite: bool = False,
    while_copying: Callable[[], None] | None = None,
    before_commit: Callable[[], None] | None = None,
    progress: Progress | None = None,
    fsync: bool = False,
) -> int:
    """Write atomically; returns the number of bytes written.

    `while_copying` runs once the header is written, just before the tensor data (to start work
    that runs beside the copy); `before_commit` runs once the data is written, before the rename: if
    it raises, nothing is left behind. `progress(done, total)` hears of the tensor bytes written,
    every 64 MiB or so. With `fsync`, the data and then the directory entry are flushed to the
    device, so the output also survives a power cut; like `cp` and safetensors' `save_file`, the
    writer otherwise leaves that to the kernel."""
    dest = Path(dest)
    if dest.is_dir():
        raise UsageError("output is a directory; give a file path", path=dest)
    if os.path.lexists(dest):
        if not overwrite:
            raise UsageError("output exists; pass --force to replace it", path=dest)
        if not stat.S_ISREG(os.lstat(dest).st_mode) and not dest.is_symlink():
            # os.replace would swap a device (/dev/null as root), FIFO or socket for a regular file
            raise UsageError("output is not a regular file; refusing to replace it", path=dest)
    header = build_header(tensors, metadata)
    size = 8 + len(header) + sum(t.nbytes for _, t in tensors)
    directory = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{dest.name[:64]}.", suffix=".partial")
    except OSError as error:
        raise OutputError(f"cannot create a file in {directory}: {error.strerror}", path=dest) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        _write_all(fd, len(header).to_bytes(8, "little") + header)  # os.write alone may write less
        if while_copying is not None:
            while_copying()
        _write_data(fd, [tensor for _, tensor in tensors], progress)
        if os.fstat(fd).st_size != size:  # a source shrank under us: its tensors were cut short
            raise InvalidFileError(_CHANGED)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        if before_commit is not None:
            before_commit()
        os.replace(temp, dest)
        if fsync:
            _sync_directory(directory)
    except BaseException as error:
        if fd >= 0:
            os.close(fd)
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"writing failed: {error.strerror or error}", path=dest) from None
        raise
    return size


#: Called with (tensor bytes written, tensor bytes in all) as a write goes on.
Progress = Callable[[int, int], None]

_IOV_MAX = 1024  # Linux's; POSIX guarantees at least 16, and writev refuses more than the limit
if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))


_GATHER = hasattr(os, "writev")  # not on Windows: each tensor then writes itself

#: Gathered bytes are written once this many are pending (or IOV_MAX ranges), so progress moves.
_GATHER_BYTES = 64 << 20


def _write_data(fd: int, tensors: Sequence[TensorData], progress: Progress | None = None) -> None:
    """Every tensor's bytes in order, at the file position (see the module docstring)."""
    total, done, told, pending = sum(t.nbytes for t in tensors), 0, 0, 0
    gathered: list[memoryview] = []

    def advance(written: int) -> None:
        nonlocal done, told
        done += written
        if progress is not None and done > told and (done - told >= _GATHER_BYTES or done == total):
            told = done
            progress(done, total)

    def flush() -> None:
        nonlocal pending
        _write_gathered(fd, gathered)
        advance(pending)
        pending = 0

    for tensor in tensors:
        views = tensor.buffers() if _GATHER else None
        if views is None:
            flush()
            tensor.write_to(fd)
            advance(tensor.nbytes)
            continue
        gathered += views
        pending += tensor.nbytes
        if len(gathered) >= _IOV_MAX or pending >= _GATHER_BYTES:
            flush()
    flush()


def _write_gathered(fd: int, views: list[memoryview]) -> None:
    """Write and release `views` (emptying the list), IOV_MAX at a time, resuming short writes."""
    start = 0
    while start < len(views):
        batch = views[start : start + _IOV_MAX]
        try:
            written = os.writev(fd, batch)
        except OSError as error:
            if error.errno == errno.EFAULT:  # the kernel met a mapped page past a source's new end
                raise InvalidFileError(_CHANGED) from None
            raise
        if written <= 0 and any(batch):
            raise OSError(errno.EIO, "the output accepted no bytes")
        for view in batch:  # skip what was written; a partly written view keeps its tail
            if written < len(view):
                views[start] = view[written:]
                break
            written -= len(view)
            start += 1
    for view in views:
        view.release()
    views.clear()


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


def write_directory(
    dest: str | os.PathLike,
    files: dict[str, tuple[Sequence[tuple[str, TensorData]], dict[str, str]]],
    documents: dict[str, bytes],
    *,
    overwrite: bool = False,
    while_copying: Callable[[], None] | None = None,
    before_commit: Callable[[], None] | None = None,
    progress: Progress | None = None,
    fsync: bool = False,
) -> int:
    """Write a directory of safetensors files and documents atomically: built beside the
    destination under a temporary name, then renamed into place (an old one is replaced only then).
    `while_copying` runs before the first file is written, `before_commit` once every file is (if it
    raises, nothing is left behind); `progress` hears of the tensor bytes of all files together."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise UsageError("output exists; pass --force to replace it", path=dest)
    if dest.exists() and not dest.is_dir():
        raise UsageError("output exists and is not a directory", path=dest)
    if dest.exists():
        _check_replaceable(dest, {Path(name).name for name in [*files, *documents]})
    parent = dest.parent if str(dest.parent) else Path(".")
    try:
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.", suffix=".partial"))
    except OSError as error:
        raise OutputError(f"cannot create a directory in {parent}: {error.strerror}", path=dest) from None
    try:
        written, before = 0, 0
        total = sum(t.nbytes for tensors, _ in files.values() for _, t in tensors)
        if while_copying is not None:
            while_copying()
        for relative, (tensors, metadata) in files.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            ahead = None if progress is None else _offset(progress, before, total)
            written += write_safetensors(target, tensors, metadata, progress=ahead, fsync=fsync)
            before += sum(t.nbytes for _, t in tensors)
        for relative, data in documents.items():
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_document(target, data, fsync)
            written += len(data)
        if before_commit is not None:
            before_commit()
        os.chmod(staging, 0o777 & ~_umask())
        retired = None
        if dest.exists():
            retired = Path(tempfile.mkdtemp(dir=parent, prefix=f".{dest.name}.", suffix=".old"))
            os.replace(dest, retired / dest.name)
        try:
            os.replace(staging, dest)
        except BaseException:
            if retired is not None:  # put the previous output back
                os.replace(retired / dest.name, dest)
                shutil.rmtree(retired, ignore_errors=True)
            raise
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        if fsync:
            _sync_directory(staging)
            _sync_directory(parent)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise OutputError(f"writing failed: {error.strerror or error}", path=dest) from None
        raise
    return written


def _write_document(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as file:
        file.write(data)
        if fsync:
            file.flush()
            os.fsync(file.fileno())


def _offset(progress: Progress, before: int, total: int) -> Progress:
    """One file's progress as part of several: `before` bytes were written by the earlier files."""
    return lambda done, _: progress(before + done, total)


def _check_replaceable(dest: Path, names: set[str]) -> None:
    """--force replaces an earlier output, never a directory of other files: the old directory is
    deleted, so it may hold only regular files with the names this writer produces."""
    for root, directories, filenames in os.walk(dest):
        for name in filenames + [d for d in directories if os.path.islink(os.path.join(root, d))]:
            path = Path(root, name)
            if name not in names or not stat.S_ISREG(path.lstat().st_mode):
                raise UsageError(
                    f"output directory holds {str(path.relative_to(dest))!r}, which this conversion does not "
                    "write; refusing to replace it",
                    path=dest,
                )


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
