"""Exact power-of-two scaling of float tensors with numpy (no torch): an exponent shift, checked.

Folding alpha/rank = 2**k into a factor changes no mantissa bit unless a value leaves the dtype's
exponent range (fp16 subnormals, overflow); `shifted` says so by returning None instead of rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .tensors import TensorData

if TYPE_CHECKING:
    import numpy as np

FLOATS = ("F16", "BF16", "F32", "F64")


def decode(data: bytes, dtype: str) -> np.ndarray:
    """Float values, widened without rounding (fp16 and bf16 to float32)."""
    import numpy as np

    if dtype == "F16":
        return np.frombuffer(data, np.float16).astype(np.float32)
    if dtype == "BF16":
        return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F32":
        return np.frombuffer(data, np.float32)
    if dtype == "F64":
        return np.frombuffer(data, np.float64)
    raise ValueError(f"not a float dtype: {dtype}")


def encode(values: np.ndarray, dtype: str) -> bytes | None:
    """The bytes of `values` as `dtype`, or None if that would round or overflow any value."""
    import numpy as np

    if dtype not in FLOATS or not np.isfinite(values).all():
        return None
    if dtype == "BF16":
        bits = values.astype(np.float32).view(np.uint32)
        if values.dtype == np.float64 and not np.array_equal(
            bits.view(np.float32).astype(np.float64), values
        ):
            return None
        return None if (bits & 0xFFFF).any() else (bits >> 16).astype(np.uint16).tobytes()
    narrow = values.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])
    if not (np.isfinite(narrow).all() and np.array_equal(narrow.astype(values.dtype), values)):
        return None
    return narrow.tobytes()


#: dtype -> (unsigned view, mantissa bits, largest exponent field): IEEE layouts for bit-level shifts.
_LAYOUT = {"F16": ("<u2", 10, 0x1F), "BF16": ("<u2", 7, 0xFF), "F32": ("<u4", 23, 0xFF)}


def _shift_bits(data: bytes, dtype: str, log2: int) -> bytes | None:
    """data * 2**log2 in its own dtype by adding to the exponent field of every normal value whose
    result stays normal; the few others (subnormals, values near the range's ends) go through
    `shifted`'s float path. None when any value cannot be shifted exactly."""
    import numpy as np

    view, mantissa, top = _LAYOUT[dtype]
    bits = np.frombuffer(data, dtype=view)
    kind = bits.dtype.type
    magnitude = bits & kind((1 << (bits.itemsize * 8 - 1)) - 1)
    nonzero = magnitude != 0
    # normal before and after: exponent field in [max(1, 1 - log2), min(top, top - log2))
    low, high = max(1, 1 - log2) << mantissa, min(top, top - log2) << mantissa
    edge = nonzero & ((magnitude < kind(low)) | (magnitude >= kind(high))) if low < high else nonzero
    rest = None
    if edge.any():  # few values, through the float path; any inexact one ends it early
        rest = _shift_values(bits[edge].tobytes(), dtype, log2, dtype)
        if rest is None:
            return None
    step = kind(abs(log2) << mantissa)
    out = np.where(nonzero, bits + step if log2 >= 0 else bits - step, bits)
    if rest is not None:
        out[edge] = np.frombuffer(rest, dtype=view)
    return out.tobytes()


def shifted(data: bytes, dtype: str, log2: int, out_dtype: str) -> bytes | None:
    """data * 2**log2 as `out_dtype`, only if exact."""

    if dtype == out_dtype and dtype in _LAYOUT:
        return _shift_bits(data, dtype, log2)
    if (dtype, out_dtype) == ("F16", "F32") and abs(log2) <= 100:
        # every fp16 value (subnormals included) times 2**±100 is a normal float32: always exact
        import numpy as np

        return (decode(data, dtype) * np.float32(2.0**log2)).tobytes()
    return _shift_values(data, dtype, log2, out_dtype)


def _shift_values(data: bytes, dtype: str, log2: int, out_dtype: str) -> bytes | None:
    """`shifted` through float arithmetic: decode, scale, check that scaling back gives the input."""
    import numpy as np

    values = decode(data, dtype)
    with np.errstate(all="ignore"):  # overflow and underflow are detected below, not warned about
        scaled = np.ldexp(values, log2)
        if not np.array_equal(np.ldexp(scaled, -log2), values):  # a value fell off the working range
            return None
        return encode(scaled, out_dtype)


def scaled_f32(data: bytes, dtype: str, scale: float) -> bytes:
    """data * scale rounded once to float32 (the `fold_alpha` request: exact in real arithmetic only)."""
    import numpy as np

    with np.errstate(all="ignore"):
        return (decode(data, dtype).astype(np.float64) * scale).astype(np.float32).tobytes()


class NumpyTensor(TensorData):
    """A tensor whose bytes a numpy function computes from another tensor's, when needed."""

    def __init__(self, source: TensorData, compute: Callable[[bytes], bytes | None], dtype: str) -> None:
        self.source, self.compute, self.dtype, self.shape = source, compute, dtype, source.shape

    def read_bytes(self) -> bytes:
        data = self.compute(self.source.read_bytes())
        if data is None:
            raise ValueError("an exact rescaling turned out inexact: the input changed while being read")
        return data


def shift_tensor(factor: TensorData, log2: int, dtype: str | None = None) -> TensorData:
    """factor * 2**log2 as `dtype` (default: its own), computed lazily; exact when `can_shift` said so."""
    out = dtype or factor.dtype
    return NumpyTensor(factor, lambda data: shifted(data, factor.dtype, log2, out), out)


def can_shift(factor: TensorData, log2: int, dtype: str) -> bool:
    return factor.dtype in FLOATS and shifted(factor.read_bytes(), factor.dtype, log2, dtype) is not None


def scale_tensor_f32(factor: TensorData, scale: float) -> TensorData:
    return NumpyTensor(factor, lambda data: scaled_f32(data, factor.dtype, scale), "F32")
