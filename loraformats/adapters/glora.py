"""GLoRA (LyCORIS `algo=glora`): W' = W + γ · (W·A + B), A and B low-rank, γ = alpha / r.

Two layouts exist, told apart by shapes against the layer (kept as stored, `layout` field). With
A = first · second (I × I) and B = up · down (O × I·kh·kw), roles `a1`... meaning `a1.weight`:

- `"lycoris"` (LyCORIS >= 3.0): A = a1 (I, r) · a2 (r, I); B = b1 (O, r) · b2 (r, I·kh·kw); r = a2.shape[0].
- `"legacy"` (before 3.0; A1111 reads only this): A = a2 (I, r) · a1 (r, I); B = b2 (O, r) · b1 (r, I·kh·kw);
  r = a1.shape[0].

W·A contracts W's input-channel axis (per kernel position on a conv). A Tucker `bm.weight`
(r, r, kh, kw) between b1 and b2 (b2 then (r, I, 1, 1)) is read too, although LyCORIS never
creates one. Alpha is stored plainly (no rsLoRA fold, unlike LoCon/LoHa/LoKr).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, ClassVar

from ..errors import InvalidFileError
from ..families import Layer
from ..tensors import TensorData
from . import maths
from .base import Adapter, scalar_alpha_problem

if TYPE_CHECKING:
    import torch

ROLES = ("a1", "a2", "b1", "b2")
LAYOUTS = {  # layout -> (first, second, up, down) roles
    "lycoris": ("a1", "a2", "b1", "b2"),
    "legacy": ("a2", "a1", "b2", "b1"),
}


@dataclass
class GLoRA(Adapter):
    """Generalised LoRA: a low-rank change proportional to W plus an additive low-rank change."""

    a1: TensorData
    a2: TensorData
    b1: TensorData
    b2: TensorData
    bm: TensorData | None = None
    alpha: TensorData | None = None
    layout: str = "lycoris"

    algorithm: ClassVar[str] = "glora"

    @property
    def rank(self) -> int:
        first = LAYOUTS[self.layout][0]
        return getattr(self, first).shape[1]

    @property
    def scale(self) -> float:
        return maths.alpha_scale(self.alpha, self.rank)

    def tensors(self) -> dict[str, TensorData]:
        roles = {name: getattr(self, name) for name in (*ROLES, "bm", "alpha")}
        return {role: t for role, t in roles.items() if t is not None}

    def features(self) -> frozenset[str]:
        return frozenset({"glora"} | ({"glora.legacy"} if self.layout == "legacy" else set()))

    @property
    def dtype(self) -> str:
        return self.b1.dtype

    def apply(self, weight: torch.Tensor, layer: Layer) -> torch.Tensor:
        import torch

        first, second, up, down = (maths.f64(getattr(self, role)) for role in LAYOUTS[self.layout])
        first, second = first.reshape(first.shape[0], -1), second.reshape(second.shape[0], -1)
        up = up.reshape(up.shape[0], -1)
        if self.bm is not None:
            additive = up @ maths.tucker_flat(maths.f64(self.bm), down)
        else:
            additive = up @ down.reshape(down.shape[0], -1)
        base = weight.to(torch.float64)
        proportional = torch.einsum("oi...,ij,jk->ok...", base, first, second)
        change = proportional + additive.reshape(layer.weight_shape)
        return weight + (change * self.scale).to(weight.dtype)

    @classmethod
    def layout_for(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        """The layout these shapes fit on `layer` (the current one when both fit), or None."""
        fits = [name for name in LAYOUTS if _layout_problem(shapes, layer, name) is None]
        return fits[0] if fits else None

    @classmethod
    def rank_of(cls, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """r from `a1` without the layer: (I, r) or (r, I) depending on the layout, so the smaller side
        (a rank above the input width would be pointless)."""
        a1 = shapes.get("a1")
        return None if a1 is None else min(a1[0], a1[1])

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        missing = [role for role in ROLES if role not in shapes]
        if missing:
            return f"a GLoRA module needs {', '.join(r + '.weight' for r in missing)}"
        if any(len(shapes[role]) not in (2, 4) for role in ROLES):
            return "GLoRA factors must be 2-D or 4-D"
        return scalar_alpha_problem(shapes)

    wrong_target: ClassVar[str] = "GLoRA on a {kind} layer is not a valid target"

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        if cls.layout_for(shapes, layer) is None:
            return _layout_problem(shapes, layer, "lycoris")
        return None

    def check(self, layer: Layer, where: str) -> None:
        if self.layout not in LAYOUTS:
            raise InvalidFileError(f"{where}: unknown GLoRA layout {self.layout!r}")
        problem = _layout_problem({role: t.shape for role, t in self.tensors().items()}, layer, self.layout)
        if problem:
            raise InvalidFileError(f"{where}: {problem}")


def _layout_problem(shapes: dict[str, tuple[int, ...]], layer: Layer, layout: str) -> str | None:
    first, second, up, down = (shapes[role] for role in LAYOUTS[layout])
    names = LAYOUTS[layout]
    out, inp, k = layer.out_features, layer.in_features, maths.kernel(layer)
    unit = all(d == 1 for shape in (first, second, up) for d in shape[2:])
    r = first[1]
    if not unit or first[0] != inp or (second[0], second[1]) != (r, inp) or (up[0], up[1]) != (out, r):
        return (
            f"{layout} GLoRA layout needs {names[0]} ({inp}, r), {names[1]} (r, {inp}), "
            f"{names[2]} ({out}, r); got {list(first)}, {list(second)}, {list(up)}"
        )
    core = shapes.get("bm")
    if core is not None:
        if (len(core) != 4 or tuple(core[2:]) != k or core[0] != r or down[0] != core[1]
                or prod(down[1:]) != inp):  # fmt: skip
            return f"Tucker bm {list(core)} with {names[3]} {list(down)} does not fit the layer"
        return None
    if down[0] != r or prod(down[1:]) != inp * k[0] * k[1] or (len(down) == 4 and tuple(down[2:]) != k):
        return f"{names[3]} {list(down)} does not fit rank {r}, {inp} inputs and kernel {list(k)}"
    return None
