"""Norm-layer deltas (LyCORIS `train_norm=True`): weight' = weight + w_norm, bias' = bias + b_norm.

Only on `norm` layers (LayerNorm, GroupNorm), whose `Layer.weight_shape` is (C,). As with `Full`,
the bias delta is a role of its own (`bias_delta`); LyCORIS reads `b_norm` as optional, A1111
requires both.
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


@dataclass
class Norm(Adapter):
    """Additive changes to a normalisation layer's scale and shift."""

    w_norm: TensorData
    b_norm: TensorData | None = None

    algorithm: ClassVar[str] = "norm"
    additive: ClassVar[bool] = True

    def tensors(self) -> dict[str, TensorData]:
        return {"w_norm": self.w_norm} | ({"b_norm": self.b_norm} if self.b_norm is not None else {})

    def features(self) -> frozenset[str]:
        return frozenset({"norm"})

    @property
    def dtype(self) -> str:
        return self.w_norm.dtype

    def delta(self, layer: Layer, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        return maths.f64(self.w_norm).reshape(layer.weight_shape).to(dtype or torch.float64)

    def bias_delta(self, layer: Layer) -> torch.Tensor | None:
        return None if self.b_norm is None else maths.f64(self.b_norm).reshape(-1)

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        if "w_norm" not in shapes:
            return "a norm module needs w_norm"
        for role in ("w_norm", "b_norm"):
            if role in shapes and len(shapes[role]) != 1:
                return f"{role} must be 1-D, got {list(shapes[role])}"
        return None

    targets: ClassVar[tuple[str, ...]] = ("norm",)
    wrong_target: ClassVar[str] = "w_norm / b_norm adapt norm layers, not a {kind} layer"

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        for role in ("w_norm", "b_norm"):
            if role in shapes and prod(shapes[role]) != layer.out_features:
                return f"{role} {list(shapes[role])} does not fit {layer.out_features} channels"
        return None
