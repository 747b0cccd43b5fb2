"""Fused groups: one adapter on a fused module (BFL's `img_attn.qkv`) versus one per member
(`to_q`, `to_k`, `to_v`), and output rows a naming orders differently (BFL's shift/scale halves).

Only output rows are ever cut or stacked; the input side of a fused module is shared by its
members. Splitting takes rows (`Adapter.rows`): byte-identical. Fusing stacks members:

- LoRAs with byte-identical down (and mid) factors and equal scales fuse at their own rank, up
  rows concatenated: byte-identical, so kohya -> diffusers -> kohya gives back the same file;
- other LoRAs fuse block-diagonally at the summed rank, downs stacked, with an alpha that keeps
  the scale (or, when the scales differ, each up scaled in float32 and alpha = rank);
- a member the file does not adapt contributes zero rows (exact: its change is zero).

Everything else is first re-expressed as a LoRA by the planner's exact transforms, or refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .adapters import Adapter, DoRA, Exactness, Full, LoRA
from .errors import UnsupportedError
from .families import Layer
from .tensors import BlockDiagonal, ComputedTensor, ConcatRows, MemoryTensor, TensorData, Zeros

if TYPE_CHECKING:
    import torch


@dataclass
class Fused:
    """The result of stacking members: the adapter, how exact it is, and how it was built."""

    adapter: Adapter
    exactness: Exactness
    how: str  # "shared" (original rank) or "block-diagonal"


def stack_rows(parts: list[Adapter | None], layers: list[Layer]) -> Fused:
    """One adapter whose output rows are the parts' in order; `None` parts add zero rows."""
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("nothing to stack")
    doras = [p for p in present if isinstance(p, DoRA)]
    if doras:
        if len(doras) < len(present):
            raise UnsupportedError("a group mixes DoRA and plain members; the plain rows have no magnitude")
        if len(present) < len(parts):
            raise UnsupportedError(
                "a DoRA group misses members; their magnitudes would depend on the base weights"
            )
        if any(dora.axis != "output" for dora in doras):
            raise UnsupportedError("an input-axis DoRA normalises whole columns; its members cannot be fused")
        inner = stack_rows([dora.inner for dora in doras], layers)
        pieces = [_rows_first(dora.magnitude, layer) for dora, layer in zip(doras, layers, strict=True)]
        return Fused(DoRA(inner.adapter, ConcatRows(pieces), "output"), inner.exactness, inner.how)
    if all(isinstance(p, Full) for p in present):
        return _stack_full(parts, layers)
    if all(isinstance(p, LoRA) and p.mid is None for p in present):
        return _stack_loras(parts, layers)
    kinds = sorted({p.algorithm for p in present})
    raise UnsupportedError(f"{'/'.join(kinds)} members cannot be stacked as they are")


def reorder_rows(adapter: Adapter, ranges: tuple[tuple[int, int], ...], layer: Layer) -> Adapter:
    """The adapter with its output rows taken range by range (a permutation of row blocks). An
    input-axis DoRA keeps its magnitude: permuting rows leaves every column's norm as it was."""
    if isinstance(adapter, DoRA) and adapter.axis == "input":
        return DoRA(reorder_rows(adapter.inner, ranges, layer), adapter.magnitude, "input")
    parts = [adapter.rows(start, stop) for start, stop in ranges]
    layers = [Layer(layer.kind, layer.in_features, stop - start, layer.kernel) for start, stop in ranges]
    return stack_rows(parts, layers).adapter


def inverse(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    """The ranges that undo `reorder_rows(…, ranges)`."""
    placed, position = [], 0
    for start, stop in ranges:
        placed.append((start, position, position + stop - start))
        position += stop - start
    return tuple((begin, end) for _, begin, end in sorted(placed))


def _rows_first(magnitude: TensorData, layer: Layer) -> TensorData:
    if magnitude.shape[0] != layer.out_features:
        return magnitude.reshaped((layer.out_features, *([1] * (len(magnitude.shape) - 1))))
    return magnitude


def _stack_full(parts: list[Full | None], layers: list[Layer]) -> Fused:
    present = [p for p in parts if p is not None]
    dtype = present[0].diff.dtype
    if any(p.diff.dtype != dtype for p in present):
        raise UnsupportedError("full deltas of one group are stored in different dtypes")
    diffs = [
        p.diff if p else Zeros(dtype, layer.weight_shape) for p, layer in zip(parts, layers, strict=True)
    ]
    bias = None
    if any(p.diff_b is not None for p in present):
        bias = ConcatRows(
            [
                p.diff_b if p and p.diff_b is not None else Zeros(dtype, (layer.out_features,))
                for p, layer in zip(parts, layers, strict=True)
            ]
        )
    return Fused(Full(ConcatRows(diffs), bias), Exactness.IDENTICAL, "stacked")


def _stack_loras(parts: list[LoRA | None], layers: list[Layer]) -> Fused:
    present = [p for p in parts if p is not None]
    first = present[0]
    if all(_shares_down(first, p) for p in present[1:]):
        ups = [
            p.up if p else Zeros(first.up.dtype, (layer.out_features, *first.up.shape[1:]))
            for p, layer in zip(parts, layers, strict=True)
        ]
        if len({u.dtype for u in ups}) == 1:
            fused = LoRA(first.down, ConcatRows(ups), None, first.alpha, first.rank_scaling)
            return Fused(fused, Exactness.IDENTICAL, "shared")
    return _block_diagonal(parts, layers)


def _shares_down(a: LoRA, b: LoRA) -> bool:
    same_scale = (a.rank, a.rank_scaling, a.alpha_value) == (b.rank, b.rank_scaling, b.alpha_value)
    return same_scale and a.down.same_bytes(b.down)


def _block_diagonal(parts: list[LoRA | None], layers: list[Layer]) -> Fused:
    present = [p for p in parts if p is not None]
    rank = sum(p.rank for p in present)
    scales = {p.scale for p in present}
    exactness = Exactness.EXACT  # alpha is rewritten so that alpha / rank stays the same number
    if len(scales) == 1:
        ups = [p.up for p in present]
        alpha_value = scales.pop() * rank
        if _as_f32(alpha_value) != alpha_value:
            exactness = Exactness.ROUNDED
    else:  # each up carries its own scale; the fused module has scale 1
        ups, alpha_value, exactness = (
            [_scaled(p.up, p.scale) for p in present],
            float(rank),
            Exactness.ROUNDED,
        )
    downs = [p.down for p in present]
    if len({d.dtype for d in downs}) > 1:
        downs, exactness = [_scaled(d, 1.0) for d in downs], Exactness.ROUNDED
    if len({u.dtype for u in ups}) > 1:
        ups, exactness = [_scaled(u, 1.0) for u in ups], Exactness.ROUNDED
    blocks, given = [], iter(ups)
    for part, layer in zip(parts, layers, strict=True):
        blocks.append(
            next(given) if part else Zeros(ups[0].dtype, (layer.out_features, 0, *ups[0].shape[2:]))
        )
    fused = LoRA(ConcatRows(downs), BlockDiagonal(blocks), None, MemoryTensor.f32(alpha_value), "rank")
    return Fused(fused, exactness, "block-diagonal")


def _as_f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _scaled(tensor: TensorData, factor: float) -> TensorData:
    """tensor x factor in float32 (computed in float64, rounded once)."""

    def compute() -> torch.Tensor:
        import torch

        return (tensor.to_torch().to(torch.float64) * factor).to(torch.float32)

    return ComputedTensor(compute, "F32", tensor.shape)
