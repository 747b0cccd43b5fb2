"""DoRA (weight-decomposed LoRA): W' = m * V / ||V||, V = W + delta, with the norm's axis explicit.

PEFT and LyCORIS >= 3.2 (`wd_on_output`) normalise each output row; older LyCORIS files each input
column. The magnitude tensor is kept as stored; its axis is recorded, never guessed by writers.
Canonical maths uses no epsilon (PEFT's definition); LyCORIS and ComfyUI add the dtype's machine
epsilon to the norm, a relative difference below 1e-7 in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, ClassVar

from ..errors import InvalidFileError
from ..families import Layer
from ..tensors import TensorData
from .base import Adapter
from .lora import LoRA

if TYPE_CHECKING:
    import torch

AXES = ("output", "input")


@dataclass
class DoRA(Adapter):
    """A weight-decomposed LoRA. `magnitude` has one value per output row or input column."""

    inner: LoRA
    magnitude: TensorData
    axis: str = "output"

    algorithm: ClassVar[str] = "dora"

    @classmethod
    def from_roles(cls, roles: dict[str, TensorData], extras: dict) -> DoRA:
        extras = dict(extras)
        axis = extras.pop("magnitude_axis", "output")
        inner = {role: tensor for role, tensor in roles.items() if role != "magnitude"}
        return cls(LoRA.from_roles(inner, extras), roles["magnitude"], axis)

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        if "magnitude" not in shapes:
            return "a DoRA module needs its magnitude vector"
        return LoRA.factor_problem({role: s for role, s in shapes.items() if role != "magnitude"})

    @classmethod
    def shape_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        problem = cls.factor_problem(shapes) or LoRA.shape_problem(
            {role: s for role, s in shapes.items() if role != "magnitude"}, layer
        )
        if problem:
            return problem
        count = prod(shapes["magnitude"])
        if count not in (layer.out_features, layer.in_features):
            return f"magnitude {list(shapes['magnitude'])} fits neither the layer's outputs nor its inputs"
        return None

    def check(self, layer: Layer, where: str) -> None:
        self.inner.check(layer, where)
        expected = layer.out_features if self.axis == "output" else layer.in_features
        if self.axis not in AXES or prod(self.magnitude.shape) != expected:
            shape, axis = list(self.magnitude.shape), self.axis
            raise InvalidFileError(f"{where}: magnitude {shape} does not fit the {axis} axis ({expected})")

    def tensors(self) -> dict[str, TensorData]:
        return {**self.inner.tensors(), "magnitude": self.magnitude}

    def features(self) -> frozenset[str]:
        return self.inner.features() | {"dora", f"dora.{self.axis}"}

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    def apply(self, weight: torch.Tensor, layer: Layer) -> torch.Tensor:
        import torch

        combined = self.inner.apply(weight, layer)
        magnitude = self.magnitude.to_torch().to(weight.dtype)
        if self.axis == "output":
            dims = tuple(range(1, combined.dim()))
            shape = (-1,) + (1,) * (combined.dim() - 1)
        else:
            dims = (0, *range(2, combined.dim()))
            shape = (1, -1) + (1,) * (combined.dim() - 2)
        norm = torch.linalg.vector_norm(combined, dim=dims, keepdim=True)
        return combined * (magnitude.reshape(shape) / norm)
