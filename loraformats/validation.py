"""Semantic checks on the canonical form: values a valid header cannot rule out.

Counting NaN/Inf needs every tensor's bytes but no maths, so it uses numpy on the raw bits and
never imports torch (conversions that only rename stay torch-free, invariant 8).
"""

from __future__ import annotations

import numpy as np

from .canonical import AdapterSet
from .errors import InvalidFileError

#: Float dtypes as (unsigned view, mask): a value is NaN or ±Inf when all of its mask bits are set.
#: Testing bits gives one rule for every float dtype, including those numpy cannot represent
#: (BF16, FP8). F8_E4M3 is the "fn" variant: no infinities, only S.1111.111 is NaN; F8_E8M0 is
#: all exponent and 0xFF is its NaN.
_NONFINITE_BITS: dict[str, tuple[str, int]] = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000),
    "F32": ("<u4", 0x7F80_0000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F8_E5M2": ("u1", 0x7C),
    "F8_E4M3": ("u1", 0x7F),
    "F8_E8M0": ("u1", 0xFF),
}


#: Bytes scanned per step: small enough that the buffers stay in cache.
_CHUNK = 1 << 20


def count_nonfinite(data: bytes | memoryview, dtype: str, scratch: np.ndarray | None = None) -> int:
    """NaN and ±Inf values among little-endian `data` of `dtype`; 0 for integer and bool dtypes.

    Chunked, and counting only where a chunk's masked maximum shows such a value at all: a finite
    tensor costs one AND and one max per value."""
    if dtype not in _NONFINITE_BITS:
        return 0
    view, mask = _NONFINITE_BITS[dtype]
    bits = np.frombuffer(data, dtype=view)
    step = _CHUNK // bits.itemsize
    if scratch is None or scratch.nbytes < min(len(bits), step) * bits.itemsize:
        scratch = np.empty(min(len(bits), step) * bits.itemsize, dtype=np.uint8)
    masked = scratch[: min(len(bits), step) * bits.itemsize].view(bits.dtype)
    total = 0
    for start in range(0, len(bits), step):
        chunk = bits[start : start + step]
        out = masked[: len(chunk)]
        np.bitwise_and(chunk, bits.dtype.type(mask), out=out)
        if out.max() == mask:
            total += int(np.count_nonzero(out == mask))
    return total


def scan_nonfinite(adapters: AdapterSet) -> dict[str, int]:
    """NaN/Inf counts per module ("component:path"), over all of its tensors (alpha included).

    Only modules with at least one such value appear, so an empty dict means the weights are
    finite. Reads each tensor once; peak memory is about twice the largest tensor.
    """
    counts: dict[str, int] = {}
    buffer, scratch = bytearray(_CHUNK), np.empty(_CHUNK, dtype=np.uint8)  # reused: no page faults
    for (component, path), adapter in adapters.modules.items():
        total = 0
        for role, tensor in adapter.tensors().items():
            if tensor.dtype not in _NONFINITE_BITS:
                continue
            seen = 0
            for piece in tensor.chunks(buffer):
                total += count_nonfinite(piece, tensor.dtype, scratch)
                seen += len(piece)
            if seen != tensor.nbytes:  # the file shrank after its header was validated
                raise InvalidFileError(
                    f"{component}:{path} {role}: read {seen} of {tensor.nbytes} bytes",
                    path=adapters.provenance.path,
                )
        if total:
            counts[f"{component}:{path}"] = total
    return counts
