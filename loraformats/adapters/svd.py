"""Rank reduction by truncated SVD: the one lossy re-expression, with its error measured exactly.

A module whose change is already low-rank (`Adapter.low_rank`, inner size k) is decomposed exactly
through two thin QRs and a k×k SVD (milliseconds at real sizes). A dense change (LoHa/LoKr above
their cap, full diffs) goes through `torch.svd_lowrank` (randomized) when a rank is asked for, so
big files take seconds. The reported error is always *measured* on the float32 factors that will be
written: ‖ΔW − up·down‖_F / ‖ΔW‖_F, never estimated from singular values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..families import Layer
from . import maths
from .base import Adapter

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: Largest inner size decomposed exactly through QR; larger low-rank inputs are treated as dense.
EXACT_INNER_LIMIT = 2048
#: Extra columns and power iterations of the randomized SVD.
OVERSAMPLE, POWER_ITERATIONS = 10, 3


@dataclass
class Truncation:
    """Float32 factors of the flattened change and how far they are from it."""

    up: torch.Tensor  # (O, r), float32
    down: torch.Tensor  # (r, I·kh·kw), float32
    error: float  # ‖ΔW − up·down‖_F (absolute, float64)
    norm: float  # ‖ΔW‖_F

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm else 0.0


def truncate(adapter: Adapter, layer: Layer, rank: int | None, max_error: float | None) -> Truncation:
    """The smallest truncation within `rank` (if given) meeting `max_error` (relative, if given)."""
    rows, cols = layer.out_features, maths.flat_in(layer)
    factors = adapter.low_rank(layer)
    if factors is not None and factors[0].shape[1] <= EXACT_INNER_LIMIT:
        return _from_factors(*factors, rank, max_error)
    dense = adapter.delta(layer).reshape(rows, cols)
    return _from_dense(dense, rank, max_error)


def _choose(singular: torch.Tensor, total: float, rank: int | None, max_error: float | None) -> int:
    """How many leading singular values to keep (at least one)."""
    import torch

    limit = singular.numel() if rank is None else min(rank, singular.numel())
    if max_error is None:
        return max(limit, 1)
    kept = torch.cumsum(singular.double() ** 2, 0)
    tail = (total - kept).clamp_min(0)  # residual energy after keeping i + 1 values
    good = torch.nonzero(tail <= (max_error**2) * total)
    needed = int(good[0]) + 1 if good.numel() else singular.numel()
    return max(min(needed, limit), 1)


def _from_factors(u: torch.Tensor, v: torch.Tensor, rank: int | None, max_error: float | None) -> Truncation:
    import torch

    ru, rv = _gram_triangle(u), _gram_triangle(v.T)
    if ru is None or rv is None:  # rank-deficient or wide factors: Householder, Q formed
        qu, ru = torch.linalg.qr(u)
        qv, rv = torch.linalg.qr(v.T)
        p, s, qt = torch.linalg.svd(ru @ rv.T)
        total = float((s**2).sum())
        keep = _choose(s, total, rank, max_error)
        up, down = (qu @ p[:, :keep]) * s[:keep], qt[:keep] @ qv.T
    else:
        p, s, qt = torch.linalg.svd(ru @ rv.T)
        total = float((s**2).sum())
        keep = _choose(s, total, rank, max_error)
        # Q_u = u R_u⁻¹ and Q_v = vᵀ R_v⁻¹ are never formed: only their leading `keep` combinations.
        left = torch.linalg.solve_triangular(ru, p[:, :keep] * s[:keep], upper=True)
        right = torch.linalg.solve_triangular(rv, qt[:keep].T, upper=True)
        up, down = u @ left, right.T @ v
    up, down = up.to(torch.float32), down.to(torch.float32)
    return Truncation(up, down, _difference_norm(u, v, up.double(), down.double(), total), total**0.5)


def _gram_triangle(matrix: Tensor) -> Tensor | None:
    """R of a thin QR of a tall, well-conditioned matrix, by Cholesky of its Gram matrix (BLAS speed),
    or None. Whatever rounding it leaves, the error reported is measured afterwards, not inferred."""
    import torch

    rows, cols = matrix.shape
    if cols > rows:
        return None
    factor, info = torch.linalg.cholesky_ex(matrix.T @ matrix, upper=True)
    diagonal = factor.diagonal().abs()
    if int(info) != 0 or not bool(torch.isfinite(factor).all()) or diagonal.min() <= 1e-6 * diagonal.max():
        return None
    return factor


def _difference_norm(u: Tensor, v: Tensor, x: Tensor, y: Tensor, total: float) -> float:
    """‖u v − x y‖_F from small Gram products (‖A‖² − 2⟨A, B⟩ + ‖B‖², with ‖A‖² = `total`); when the
    difference is so small that the subtraction would lose it, through thin QRs of stacked factors."""
    import torch

    inner = float(torch.trace((u.T @ x) @ (y @ v.T)))
    own = float(torch.trace((x.T @ x) @ (y @ y.T)))
    squared = total - 2 * inner + own
    if squared > 1e-8 * total:
        return squared**0.5
    return _low_rank_norm(torch.cat([u, -x], 1), torch.cat([v, y], 0))


def _from_dense(dense: torch.Tensor, rank: int | None, max_error: float | None) -> Truncation:
    import torch

    total = float((dense**2).sum())
    smaller = min(dense.shape)
    if rank is not None and max_error is None and rank + OVERSAMPLE < smaller:
        u, s, v = torch.svd_lowrank(dense, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
    else:  # an error bound needs the whole spectrum; so does a rank near full
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        v = vh.T
    keep = _choose(s, total, rank, max_error)
    up = (u[:, :keep] * s[:keep]).to(torch.float32)
    down = v[:, :keep].T.to(torch.float32)
    error = float(torch.linalg.norm(dense - up.double() @ down.double()))
    return Truncation(up, down, error, total**0.5)


def _low_rank_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """‖u @ v‖_F through thin QRs (u is tall, v is wide), without forming the product."""
    import torch

    return float(torch.linalg.norm(torch.linalg.qr(u).R @ torch.linalg.qr(v.T).R.T))
