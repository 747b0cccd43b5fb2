"""Small maths shared by the adapters and the transforms, all in float64.

Products of factors are formed here once (Tucker contractions, face-splitting and Khatri–Rao
products, Kronecker products of factor pairs), so every adapter and re-expression agrees on index
order: a conv weight (O, I, kh, kw) is flattened to (O, I·kh·kw), kernel index fastest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..families import Layer
from ..tensors import TensorData

if TYPE_CHECKING:
    import torch


def f64(tensor: TensorData, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The values in float64 (or in `dtype`)."""
    import torch

    return tensor.to_torch().to(dtype or torch.float64)


#: Storage dtypes whose pairwise products float32 holds exactly (8- or 11-bit significands).
NARROW = ("F16", "BF16")


def scaled_f32(up: torch.Tensor, down: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) as float32, `scale` folded into the smaller one (in float64, rounded once)."""
    import torch

    if scale == 1.0:
        return up.to(torch.float32), down.to(torch.float32)
    if up.numel() <= down.numel():
        return (up.to(torch.float64) * scale).to(torch.float32), down.to(torch.float32)
    return up.to(torch.float32), (down.to(torch.float64) * scale).to(torch.float32)


def kernel(layer: Layer) -> tuple[int, int]:
    return tuple(layer.kernel) if layer.kind == "conv2d" else (1, 1)


def flat_in(layer: Layer) -> int:
    """Columns of the flattened weight: I·kh·kw."""
    kh, kw = kernel(layer)
    return layer.in_features * kh * kw


def alpha_scale(alpha: TensorData | None, rank: int) -> float:
    """alpha / rank in float64; an absent or zero alpha means alpha = rank (sd-scripts, LyCORIS)."""
    value = alpha.scalar() if alpha is not None else 0.0
    return (value or float(rank)) / float(rank)


def tucker_flat(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """V[a, (i, h, w)] = Σ_b core[a, b, h, w] · down[b, i]: a Tucker core folded into its input factor."""
    import torch

    return torch.einsum("abhw,bi->aihw", core, down.reshape(down.shape[0], -1)).reshape(core.shape[0], -1)


def face_split(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Row-wise Kronecker product: out[o, a·r2 + b] = u1[o, a] · u2[o, b]."""
    return (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)


def khatri_rao(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: out[a·r2 + b, n] = v1[a, n] · v2[b, n]."""
    return (v1[:, None, :] * v2[None, :, :]).reshape(-1, v1.shape[1])


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product (torch.kron fails on some non-contiguous views, e.g. transposes)."""
    import torch

    return torch.kron(a.contiguous(), b.contiguous())


def identity_factors(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact factorisation of a (O, n) matrix at rank min(O, n), without any decomposition:
    (I_O, ΔW) when O <= n, else (ΔW, I_n)."""
    import torch

    rows, cols = dense.shape
    if rows <= cols:
        return torch.eye(rows, dtype=dense.dtype), dense
    return dense, torch.eye(cols, dtype=dense.dtype)
