"""A file whose tensor data cannot be read, for real: served by a tiny FUSE file system.

The kernel passes every read of the mounted file to this process (direct I/O, no page cache).
Reads that start inside the data section fail with EIO, as on a disk with bad sectors there; a read
that starts in the header and runs past it returns the header bytes only (a short read, as at the
end of a file), so buffered readers that ask for more than they need still work.

Run as a script (the tests do, in a subprocess with a timeout, so a stuck mount cannot hang them):

    python tests/unreadable.py FILE MOUNTPOINT -- PYTHON-CODE

mounts MOUNTPOINT with FILE's bytes at MOUNTPOINT/FILENAME and runs PYTHON-CODE with `path` bound
to it. Needs root (or CAP_SYS_ADMIN) and /dev/fuse; `available()` says whether both are there.
Only the protocol messages a read-only file needs are implemented (FUSE 7.31).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys
import threading
from pathlib import Path

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
ENTRY = struct.Struct("<QQQQII")  # fuse_entry_out before its attr
READ_IN = struct.Struct("<QQII")  # fh, offset, size, read_flags (the rest is not needed)

LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, IOCTL, INTERRUPT, BATCH_FORGET = (
    1, 2, 3, 14, 15, 18, 25, 26, 39, 36, 42,
)  # fmt: skip
NO_REPLY = {FORGET, INTERRUPT, BATCH_FORGET}
FOPEN_DIRECT_IO = 1
ROOT, FILE = 1, 2
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2
CANNOT_MOUNT = 77  # exit status: the test skips rather than fails


def available() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/fuse")


class UnreadableData:
    """Serves one file: `content` is readable up to `boundary`; reads starting beyond it fail."""

    def __init__(self, name: str, content: bytes, boundary: int) -> None:
        self.name, self.content, self.boundary = name.encode(), content, boundary
        self.refused: list[tuple[int, int]] = []  # (offset, size) of every read that failed

    def attr(self, node: int) -> bytes:
        if node == ROOT:
            return ATTR.pack(ROOT, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, 4096, 0)
        size = len(self.content)
        return ATTR.pack(FILE, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, stat.S_IFREG | 0o444, 1, 0, 0, 0,
                         4096, 0)  # fmt: skip

    def answer(self, opcode: int, node: int, body: bytes) -> tuple[int, bytes]:
        """(negative errno or 0, reply payload) for one request."""
        if opcode == INIT:
            readahead = struct.unpack_from("<IIII", body)[2]  # major, minor, max_readahead, flags
            reply = struct.pack("<IIIIHHIIHHII", 7, 31, readahead, 0, 16, 12, 65536, 1, 0, 0, 0, 0)
            return 0, reply + bytes(24)  # fuse_init_out is 64 bytes; the rest is unused
        if opcode == LOOKUP:
            if node != ROOT or body.rstrip(b"\0") != self.name:
                return -errno.ENOENT, b""
            return 0, ENTRY.pack(FILE, 0, 60, 60, 0, 0) + self.attr(FILE)
        if opcode == GETATTR:
            return 0, struct.pack("<QII", 60, 0, 0) + self.attr(node)
        if opcode == OPEN:
            return 0, struct.pack("<QIi", 0, FOPEN_DIRECT_IO, 0)
        if opcode == READ:
            _, offset, size, _ = READ_IN.unpack_from(body)
            if offset >= self.boundary:
                self.refused.append((offset, size))
                return -errno.EIO, b""
            return 0, self.content[offset : min(offset + size, self.boundary)]
        if opcode in (RELEASE, FLUSH):
            return 0, b""
        if opcode == IOCTL:
            return -errno.ENOTTY, b""
        return -errno.ENOSYS, b""

    def serve(self, fd: int) -> None:
        while True:
            try:
                request = os.read(fd, 1 << 20)
            except OSError:  # ENODEV once unmounted
                return
            _, opcode, unique, node, *_ = IN_HEADER.unpack_from(request)
            if opcode in NO_REPLY:
                continue
            error, payload = self.answer(opcode, node, request[IN_HEADER.size :])
            try:
                os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(payload), error, unique) + payload)
            except OSError:  # the request was interrupted
                continue


def mount(server: UnreadableData, mountpoint: Path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open("/dev/fuse", os.O_RDWR)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
    if libc.mount(b"loraformats-test", bytes(mountpoint), b"fuse", MS_NOSUID | MS_NODEV, options) != 0:
        os.close(fd)
        raise OSError(ctypes.get_errno(), f"mount {mountpoint}")
    threading.Thread(target=server.serve, args=(fd,), daemon=True).start()
    return fd


def unmount(mountpoint: Path) -> None:
    ctypes.CDLL(None, use_errno=True).umount2(bytes(mountpoint), MNT_DETACH)


def main(argv: list[str]) -> int:
    source, mountpoint, _, code = Path(argv[0]), Path(argv[1]), argv[2], argv[3]
    content = source.read_bytes()
    (n,) = struct.unpack("<Q", content[:8])
    server = UnreadableData(source.name, content, 8 + n)
    try:
        fd = mount(server, mountpoint)
    except OSError as error:  # e.g. a container without CAP_SYS_ADMIN
        print(f"cannot mount: {error}", file=sys.stderr)
        return CANNOT_MOUNT
    try:
        exec(code, {"path": mountpoint / source.name, "server": server})
    finally:
        unmount(mountpoint)
        os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
