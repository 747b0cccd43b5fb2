"""Orthogonal fine-tuning as LyCORIS defines it: Diag-OFT (`algo=diag-oft`) and BOFT (`algo=boft`).

Both rotate the *output* rows of W with Cayley transforms of skew-symmetric blocks:
Q = B − Bᵀ per block; with a constraint c = `alpha` > 0 and C = c·O, if ‖Q‖_F + 1e-8 > C (Frobenius
norm over all blocks together, as LyCORIS computes it) then Q ← Q·C / (‖Q‖_F + 1e-8);
R = (I + Q)(I − Q)⁻¹. An optional `rescale` (O, 1[, 1, 1]) multiplies the result row-wise.

- Diag-OFT: `oft_blocks` (n, b, b), n·b = O; W'_k = R_kᵀ · W_k for row block k.
- BOFT: `oft_blocks` (m, n, b, b); m butterfly stages, stage i permutes rows (groups of 2·2^i·b/2,
  halves interleaved), multiplies each block of b rows by R_{i,j} (R, not Rᵀ), and undoes the
  permutation.

These are the definitions of LyCORIS's training forward at strength 1. ComfyUI and A1111 take the
constraint bound as `alpha` rather than `alpha·O`, and PEFT's OFT/BOFT rotate the input side with
another parametrisation; none of them can hold these modules exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, ClassVar

from ..families import Layer
from ..tensors import TensorData
from . import maths
from .base import Adapter

if TYPE_CHECKING:
    import torch

EPS = 1e-8  # LyCORIS adds it to the norm before comparing with the constraint


def cayley(blocks: torch.Tensor, constraint: float, out_features: int) -> torch.Tensor:
    """R per block (float64) from raw blocks, with LyCORIS's constraint rule."""
    import torch

    q = blocks - blocks.transpose(-1, -2)
    bound = constraint * out_features
    if bound > 0:
        norm = torch.linalg.vector_norm(q) + EPS
        if norm > bound:
            q = q * (bound / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


@dataclass
class _Orthogonal(Adapter):
    oft_blocks: TensorData
    alpha: TensorData | None = None
    rescale: TensorData | None = None

    blocks_ndim: ClassVar[int]

    @property
    def constraint(self) -> float:
        return self.alpha.scalar() if self.alpha is not None else 0.0

    def tensors(self) -> dict[str, TensorData]:
        roles = {"oft_blocks": self.oft_blocks, "alpha": self.alpha, "rescale": self.rescale}
        return {role: t for role, t in roles.items() if t is not None}

    def features(self) -> frozenset[str]:
        return frozenset({self.algorithm})

    @property
    def dtype(self) -> str:
        return self.oft_blocks.dtype

    def rotations(self, layer: Layer) -> torch.Tensor:
        return cayley(maths.f64(self.oft_blocks), self.constraint, layer.out_features)

    def apply(self, weight: torch.Tensor, layer: Layer) -> torch.Tensor:
        import torch

        rows = weight.to(torch.float64).reshape(layer.out_features, -1)
        rotated = self.rotate(rows, self.rotations(layer))
        if self.rescale is not None:
            rotated = rotated * maths.f64(self.rescale).reshape(-1, 1)
        return rotated.reshape(weight.shape).to(weight.dtype)

    def rotate(self, rows: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        blocks = shapes.get("oft_blocks")
        if blocks is None:
            return "an OFT module needs oft_blocks"
        if len(blocks) != cls.blocks_ndim or blocks[-1] != blocks[-2]:
            dims = cls.blocks_ndim
            return f"{cls.algorithm} oft_blocks must be {dims}-D with square blocks, got {list(blocks)}"
        alpha = shapes.get("alpha")
        if alpha is not None and prod(alpha) != 1:
            return f"alpha (the constraint) must be a scalar, got shape {list(alpha)}"
        return None

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        blocks = shapes["oft_blocks"]
        if blocks[-3] * blocks[-1] != layer.out_features:
            return f"oft_blocks {list(blocks)} do not partition {layer.out_features} outputs"
        rescale = shapes.get("rescale")
        if rescale is not None and (rescale[0] != layer.out_features or prod(rescale) != rescale[0]):
            return f"rescale {list(rescale)} is not one value per output"
        return cls.extra_problem(blocks, layer)

    @classmethod
    def extra_problem(cls, blocks: tuple[int, ...], layer: Layer) -> str | None:
        return None


@dataclass
class DiagOFT(_Orthogonal):
    """Block-diagonal orthogonal rotation of the output rows."""

    algorithm: ClassVar[str] = "diag-oft"
    blocks_ndim: ClassVar[int] = 3

    def rotate(self, rows: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        import torch

        count, size, _ = rotations.shape
        grouped = rows.reshape(count, size, -1)
        return torch.einsum("knm,kni->kmi", rotations, grouped).reshape(rows.shape)


@dataclass
class BOFT(_Orthogonal):
    """Butterfly orthogonal rotation of the output rows (m stages of block rotations)."""

    algorithm: ClassVar[str] = "boft"
    blocks_ndim: ClassVar[int] = 4

    @classmethod
    def extra_problem(cls, blocks: tuple[int, ...], layer: Layer) -> str | None:
        stages, count, size, _ = blocks
        if size % 2 or count & (count - 1) or (2 ** (stages - 1)) * size > layer.out_features:
            return f"BOFT oft_blocks {list(blocks)} are not a butterfly of {layer.out_features} outputs"
        return None

    def rotate(self, rows: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
        import torch

        stages, _, size, _ = rotations.shape
        half = size // 2
        x = rows
        for stage in range(stages):
            width = 2**stage * half
            x = x.unflatten(0, (-1, 2, width)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, size))
            x = torch.einsum("bij,bj...->bi...", rotations[stage], x)
            x = x.flatten(0, 1).unflatten(0, (-1, width, 2)).transpose(1, 2).flatten(0, 2)
        return x
