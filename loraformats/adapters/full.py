"""Full weight deltas (LyCORIS `algo=full`): W' = W + diff, and a bias delta b' = b + diff_b.

`diff_b` is a change of the layer's *bias*, not of its weight. `Layer` describes the weight only
(families do not list biases), so the bias delta is a separate role, checked against the layer's
output count (a Linear or conv bias has one value per output) and exposed by `bias_delta`; `delta`
and `apply` are about the weight. A target that cannot hold bias deltas refuses the module rather
than dropping `diff_b`.
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
class Full(Adapter):
    """A dense weight delta (any rank), optionally with a bias delta."""

    diff: TensorData
    diff_b: TensorData | None = None

    algorithm: ClassVar[str] = "full"
    additive: ClassVar[bool] = True

    def tensors(self) -> dict[str, TensorData]:
        return {"diff": self.diff} | ({"diff_b": self.diff_b} if self.diff_b is not None else {})

    def features(self) -> frozenset[str]:
        return frozenset({"full", "full.bias"} if self.diff_b is not None else {"full"})

    @property
    def dtype(self) -> str:
        return self.diff.dtype

    def rows(self, start: int, stop: int) -> Full:
        bias = self.diff_b.rows(start, stop) if self.diff_b is not None else None
        return Full(self.diff.rows(start, stop), bias)

    def delta(self, layer: Layer, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        return maths.f64(self.diff).reshape(layer.weight_shape).to(dtype or torch.float64)

    def bias_delta(self, layer: Layer) -> torch.Tensor | None:
        return None if self.diff_b is None else maths.f64(self.diff_b).reshape(-1)

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        if "diff" not in shapes:
            return "a full module needs diff"
        bias = shapes.get("diff_b")
        if bias is not None and len(bias) != 1:
            return f"diff_b must be 1-D, got {list(bias)}"
        return None

    wrong_target: ClassVar[str] = (
        "a weight diff on a {kind} layer is not a valid target (norm layers use w_norm)"
    )

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        if tuple(shapes["diff"]) != layer.weight_shape:
            return f"diff {list(shapes['diff'])} is not the weight's shape {list(layer.weight_shape)}"
        bias = shapes.get("diff_b")
        if bias is not None and prod(bias) != layer.out_features:
            return f"diff_b {list(bias)} does not have one value per output ({layer.out_features})"
        return None
