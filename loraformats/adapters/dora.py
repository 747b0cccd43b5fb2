"""DoRA (weight decomposition): W' = m * V / ||V||, V = W + delta, with the norm's axis explicit.

The delta comes from an inner LoRA, LoHa or LoKr (LyCORIS `dora_wd` works with all three; PEFT
only with LoRA). PEFT and LyCORIS >= 3.2 (`wd_on_output`) normalise each output row; older LyCORIS
files each input column. The magnitude tensor is kept as stored; its axis is recorded, never
guessed by writers. Canonical maths uses no epsilon (PEFT's definition); LyCORIS and ComfyUI add
the dtype's machine epsilon to the norm, a relative difference below 1e-7 in float32.

Features: the inner adapter's, plus `dora`, `dora.<axis>` and, for a LoHa or LoKr inside,
`loha.dora` / `lokr.dora` (PEFT has DoRA for LoRA only). Re-expressing the inner delta exactly
(e.g. LoHa -> LoRA) keeps the DoRA map exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, ClassVar

from ..errors import InvalidFileError, UnsupportedError
from ..families import Layer
from ..tensors import TensorData
from .base import Adapter
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA

if TYPE_CHECKING:
    import torch

AXES = ("output", "input")

Inner = LoRA | LoHa | LoKr


def inner_class(roles: Iterable[str]) -> type[LoRA] | type[LoHa] | type[LoKr]:
    """The adapter a DoRA's other roles belong to: LoHa and LoKr roles carry their LyCORIS prefixes."""
    names = list(roles)
    if any(name.startswith("hada_") for name in names):
        return LoHa
    if any(name.startswith("lokr_") for name in names):
        return LoKr
    return LoRA


@dataclass
class DoRA(Adapter):
    """A weight-decomposed LoRA, LoHa or LoKr. `magnitude` has one value per output row or input column."""

    inner: Inner
    magnitude: TensorData
    axis: str = "output"

    algorithm: ClassVar[str] = "dora"

    @classmethod
    def from_roles(cls, roles: dict[str, TensorData], extras: dict) -> DoRA:
        extras = dict(extras)
        axis = extras.pop("magnitude_axis", "output")
        inner = {role: tensor for role, tensor in roles.items() if role != "magnitude"}
        return cls(inner_class(inner).from_roles(inner, extras), roles["magnitude"], axis)

    @classmethod
    def rank_of(cls, shapes: dict[str, tuple[int, ...]]) -> int | None:
        inner = {role: s for role, s in shapes.items() if role != "magnitude"}
        return inner_class(inner).rank_of(inner)

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        if "magnitude" not in shapes:
            return "a DoRA module needs its magnitude vector"
        inner = {role: s for role, s in shapes.items() if role != "magnitude"}
        return inner_class(inner).factor_problem(inner)

    targets: ClassVar[tuple[str, ...]] = ("linear", "conv2d", "norm")  # the inner adapter decides

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        inner = {role: s for role, s in shapes.items() if role != "magnitude"}
        problem = inner_class(inner).shape_problem(inner, layer)
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
        features = self.inner.features() | {"dora", f"dora.{self.axis}"}
        return features if isinstance(self.inner, LoRA) else features | {f"{self.inner.algorithm}.dora"}

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    def rows(self, start: int, stop: int) -> DoRA:
        """An output-axis DoRA normalises each row on its own, so rows split exactly; an input-axis one
        normalises columns over every row of the module, which no split preserves."""
        if self.axis != "output" or self.magnitude.shape[0] == 1 < prod(self.magnitude.shape):
            raise UnsupportedError("an input-axis DoRA normalises whole columns; it cannot be split by rows")
        return DoRA(self.inner.rows(start, stop), self.magnitude.rows(start, stop), self.axis)

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
