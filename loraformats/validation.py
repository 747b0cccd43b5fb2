"""Semantic checks on the canonical form: values a valid header cannot rule out.

Counting NaN/Inf needs every tensor's bytes but no maths, so it uses numpy on the raw bits and
never imports torch (conversions that only rename stay torch-free, invariant 8).
"""

from __future__ import annotations

import threading

import numpy as np

from .canonical import AdapterSet
from .errors import InvalidFileError

#: Float dtypes as (unsigned view, exponent mask, sign bit): a value is NaN or ±Inf when all of its
#: mask bits are set. Testing bits gives one rule for every float dtype, including those numpy
#: cannot represent (BF16, FP8). F8_E4M3 is the "fn" variant: no infinities, only S.1111.111 is NaN;
#: F8_E8M0 is all exponent, unsigned, and 0xFF is its NaN.
_NONFINITE_BITS: dict[str, tuple[str, int, int]] = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000, 1 << 63),
    "F32": ("<u4", 0x7F80_0000, 1 << 31),
    "F16": ("<u2", 0x7C00, 0x8000),
    "BF16": ("<u2", 0x7F80, 0x8000),
    "F8_E5M2": ("u1", 0x7C, 0x80),
    "F8_E4M3": ("u1", 0x7F, 0x80),
    "F8_E8M0": ("u1", 0xFF, 0),
}


#: Bytes scanned per step: small enough that a piece stays in cache between its two passes.
_CHUNK = 1 << 20


def count_nonfinite(data: bytes | memoryview, dtype: str) -> int:
    """NaN and ±Inf values among little-endian `data` of `dtype`; 0 for integer and bool dtypes.

    A finite piece costs two max reductions and no temporary: the exponent bits sit just below the
    sign, so a positive value has them all set exactly when it is at least the mask (read signed),
    and a negative one when it is at least sign | mask (read unsigned). Only a piece that holds such
    a value is counted exactly."""
    if dtype not in _NONFINITE_BITS:
        return 0
    view, mask, sign = _NONFINITE_BITS[dtype]
    bits = np.frombuffer(data, dtype=view)
    if not len(bits):
        return 0
    if bits.max() < sign | mask and not (sign and bits.view(view.replace("u", "i")).max() >= mask):
        return 0
    return int(np.count_nonzero(bits & bits.dtype.type(mask) == mask))


def scan_nonfinite(adapters: AdapterSet) -> dict[str, int]:
    """NaN/Inf counts per module ("component:path"), over all of its tensors (alpha included).

    Only modules with at least one such value appear, so an empty dict means the weights are
    finite. Reads each tensor once, a piece at a time.
    """
    scan = NonfiniteScan(adapters)
    scan.drain()
    return scan.counts


class NonfiniteScan:
    """`scan_nonfinite` as work that several threads can share: each `drain` takes the next tensor
    until none is left, so a caller that would otherwise wait for a background scan can help it."""

    def __init__(self, adapters: AdapterSet) -> None:
        self.path = adapters.provenance.path
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._work = iter(
            [
                (f"{component}:{path}", role, tensor)
                for (component, path), adapter in adapters.modules.items()
                for role, tensor in adapter.tensors().items()
                if tensor.dtype in _NONFINITE_BITS
            ]
        )

    def drain(self) -> None:
        buffer = bytearray(_CHUNK)  # reused: no page faults
        while True:
            with self._lock:
                item = next(self._work, None)
            if item is None:
                return
            module, role, tensor = item
            found = seen = 0
            for piece in tensor.chunks(buffer):
                found += count_nonfinite(piece, tensor.dtype)
                seen += len(piece)
            if seen != tensor.nbytes:  # the file shrank after its header was validated
                raise InvalidFileError(
                    f"{module} {role}: read {seen} of {tensor.nbytes} bytes", path=self.path
                )
            if found:
                with self._lock:
                    self.counts[module] = self.counts.get(module, 0) + found
