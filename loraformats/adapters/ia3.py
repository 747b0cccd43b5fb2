"""(IA)3 (LyCORIS `algo=ia3`): W' = W ⊙ (1 + v), v scaling output rows or input columns.

`weight` holds v: (O,) / (1, O, 1, 1) on the output side, (I,) / (1, I, 1, 1) on the input side;
`on_input` (a 0-dim integer tensor, kept as stored) says which. The change W ⊙ v depends on W,
so this adapter has no `delta`. (LyCORIS's own loader ignores `on_input` and always scales the
output side; its training forward, the definition used here, honours it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, ClassVar

from ..errors import InvalidFileError
from ..families import Layer
from ..tensors import TensorData
from . import maths
from .base import Adapter

if TYPE_CHECKING:
    import torch


@dataclass
class IA3(Adapter):
    """A learned per-channel rescaling of the base weight."""

    weight: TensorData
    on_input: TensorData

    algorithm: ClassVar[str] = "ia3"

    @property
    def input_side(self) -> bool:
        return bool(self.on_input.scalar())

    def tensors(self) -> dict[str, TensorData]:
        return {"weight": self.weight, "on_input": self.on_input}

    def features(self) -> frozenset[str]:
        return frozenset({"ia3"})

    @property
    def dtype(self) -> str:
        return self.weight.dtype

    def apply(self, weight: torch.Tensor, layer: Layer) -> torch.Tensor:
        vector = maths.f64(self.weight).reshape(-1).to(weight.dtype)
        shape = [1] * weight.dim()
        shape[1 if self.input_side else 0] = -1
        return weight * (1 + vector.reshape(shape))

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        if "weight" not in shapes or "on_input" not in shapes:
            return "an (IA)3 module needs weight and on_input"
        if prod(shapes["on_input"]) != 1:
            return f"on_input must be a scalar, got shape {list(shapes['on_input'])}"
        weight = shapes["weight"]
        if len(weight) not in (1, 4) or (len(weight) == 4 and (weight[0], *weight[2:]) != (1, 1, 1)):
            return f"(IA)3 weight must be (C,) or (1, C, 1, 1), got {list(weight)}"
        return None

    wrong_target: ClassVar[str] = "(IA)3 on a {kind} layer is not a valid target"

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        if prod(shapes["weight"]) not in (layer.out_features, layer.in_features):
            return f"(IA)3 weight {list(shapes['weight'])} fits neither the outputs nor the inputs"
        return None

    def check(self, layer: Layer, where: str) -> None:
        super().check(layer, where)
        if self.on_input.dtype not in ("I64", "I32", "I16", "I8", "U8", "BOOL", "F32", "F16", "BF16", "F64"):
            raise InvalidFileError(f"{where}: on_input has dtype {self.on_input.dtype}")
        value = self.on_input.scalar()
        if value not in (0, 1):
            raise InvalidFileError(f"{where}: on_input must be 0 or 1, got {value}")
        expected = layer.in_features if value else layer.out_features
        if prod(self.weight.shape) != expected:
            side = "input" if value else "output"
            shape = list(self.weight.shape)
            raise InvalidFileError(f"{where}: (IA)3 weight {shape} does not fit the {side} side")
