"""LoHa (LyCORIS `algo=loha`, PEFT `LoHaConfig`): ΔW = γ · (A1·B1) ⊙ (A2·B2), γ = alpha / r.

Factors keep LyCORIS's (and PEFT's, which is the same) orientation and names:

| role | Linear | Conv, plain | Conv, Tucker |
|---|---|---|---|
| `hada_w1_a`, `hada_w2_a` | (O, r) | (O, r) | (r, O) |
| `hada_w1_b`, `hada_w2_b` | (r, I) | (r, I·kh·kw) | (r, I) |
| `hada_t1`, `hada_t2` | – | – | (r, r, kh, kw) |

Tucker: P_n[o, i, h, w] = Σ_{a,b} T_n[a, b, h, w] A_n[a, o] B_n[b, i] and ΔW = γ · P1 ⊙ P2.
r (for γ) is `hada_w1_b.shape[0]`, as every loader takes it. Conv factors written 4-D by some
trainers ((O, r, 1, 1), (r, I, kh, kw)) are accepted and kept as stored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import TYPE_CHECKING, ClassVar

from ..errors import UnsupportedError
from ..families import Layer
from ..tensors import TensorData
from . import maths
from .base import Adapter, scalar_alpha_problem

if TYPE_CHECKING:
    import torch
    from torch import Tensor

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


@dataclass
class LoHa(Adapter):
    """Two low-rank products multiplied element-wise, optionally with Tucker cores."""

    hada_w1_a: TensorData
    hada_w1_b: TensorData
    hada_w2_a: TensorData
    hada_w2_b: TensorData
    hada_t1: TensorData | None = None
    hada_t2: TensorData | None = None
    alpha: TensorData | None = None

    algorithm: ClassVar[str] = "loha"
    additive: ClassVar[bool] = True

    @property
    def tucker(self) -> bool:
        return self.hada_t1 is not None

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    @property
    def ranks(self) -> tuple[int, int]:
        return self.hada_w1_b.shape[0], self.hada_w2_b.shape[0]

    @property
    def scale(self) -> float:
        return maths.alpha_scale(self.alpha, self.rank)

    def tensors(self) -> dict[str, TensorData]:
        roles = {name: getattr(self, name) for name in (*FACTORS, "hada_t1", "hada_t2", "alpha")}
        return {role: t for role, t in roles.items() if t is not None}

    def features(self) -> frozenset[str]:
        return frozenset({"loha", "loha.tucker"} if self.tucker else {"loha"})

    @property
    def dtype(self) -> str:
        return self.hada_w1_a.dtype

    def rows(self, start: int, stop: int) -> LoHa:
        """Rows of both products come from the rows of their output factors alone."""
        if self.tucker:
            raise UnsupportedError("a Tucker LoHa keeps its output factors transposed; it cannot be split")
        w1_a, w2_a = self.hada_w1_a.rows(start, stop), self.hada_w2_a.rows(start, stop)
        return replace(self, hada_w1_a=w1_a, hada_w2_a=w2_a)

    def halves(self, layer: Layer, dtype: torch.dtype | None = None) -> list[tuple[Tensor, Tensor]]:
        """(U_n, V_n) with P_n = U_n @ V_n flattened to (O, I·kh·kw), for n = 1, 2 (float64, unscaled)."""
        pairs = []
        for n in (1, 2):
            a = maths.f64(getattr(self, f"hada_w{n}_a"), dtype)
            b = maths.f64(getattr(self, f"hada_w{n}_b"), dtype)
            if self.tucker:
                core = maths.f64(getattr(self, f"hada_t{n}"), dtype)
                pairs.append((a.T, maths.tucker_flat(core, b)))
            else:
                pairs.append((a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)))
        return pairs

    def low_rank(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """γ·face-split(U1, U2) and Khatri–Rao(V1, V2): rank r1·r2, returned only below min(O, I·kh·kw)."""
        r1, r2 = self.ranks
        if r1 * r2 >= min(layer.out_features, maths.flat_in(layer)):
            return None  # the dense delta is smaller
        (u1, v1), (u2, v2) = self.halves(layer)
        return maths.face_split(u1, u2) * self.scale, maths.khatri_rao(v1, v2)

    def lora_factors(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 (up, down) of `low_rank`, for writing. A product of two float16/bfloat16 values
        is exact in float32, so plain factors in those dtypes are multiplied in float32 directly (no
        float64 detour at real sizes); others in float64, rounded once. The scale goes in once."""
        import torch

        narrow = not self.tucker and all(getattr(self, f).dtype in maths.NARROW for f in FACTORS)
        (u1, v1), (u2, v2) = self.halves(layer, torch.float32 if narrow else torch.float64)
        return maths.scaled_f32(maths.face_split(u1, u2), maths.khatri_rao(v1, v2), self.scale)

    def delta(self, layer: Layer, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        (u1, v1), (u2, v2) = self.halves(layer)
        product = (u1 @ v1) * (u2 @ v2) * self.scale
        return product.reshape(layer.weight_shape).to(dtype or torch.float64)

    @classmethod
    def rank_of(cls, shapes: dict[str, tuple[int, ...]]) -> int | None:
        return shapes["hada_w1_b"][0] if "hada_w1_b" in shapes else None

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        missing = [role for role in FACTORS if role not in shapes]
        if missing:
            return f"a LoHa module needs {', '.join(missing)}"
        if ("hada_t1" in shapes) != ("hada_t2" in shapes):
            return "a Tucker LoHa needs both hada_t1 and hada_t2"
        if problem := scalar_alpha_problem(shapes):
            return problem
        for n in (1, 2):
            a, b = shapes[f"hada_w{n}_a"], shapes[f"hada_w{n}_b"]
            if len(a) not in (2, 4) or len(b) not in (2, 4):
                return f"hada_w{n} factors must be 2-D (or 4-D), got {list(a)} and {list(b)}"
            core = shapes.get(f"hada_t{n}")
            if core is not None:
                if len(core) != 4 or len(a) != 2 or len(b) != 2 or core[0] != a[0] or core[1] != b[0]:
                    return f"Tucker hada_t{n} {list(core)} does not fit {list(a)} and {list(b)}"
            elif a[1] != b[0] or b[0] == 0:
                return f"ranks disagree: hada_w{n}_a {list(a)}, hada_w{n}_b {list(b)}"
        return None

    wrong_target: ClassVar[str] = "LoHa on a {kind} layer is not a valid target"

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        k = maths.kernel(layer)
        out, inp = layer.out_features, layer.in_features
        for n in (1, 2):
            a, b, core = shapes[f"hada_w{n}_a"], shapes[f"hada_w{n}_b"], shapes.get(f"hada_t{n}")
            if core is not None:
                if layer.kind != "conv2d" or tuple(core[2:]) != k or a[1] != out or b[1] != inp:
                    return f"Tucker LoHa {list(a)}, {list(core)}, {list(b)} does not fit {layer.weight_shape}"
                continue
            if a[0] != out or any(d != 1 for d in a[2:]):
                return f"hada_w{n}_a {list(a)} does not fit {out} outputs"
            if prod(b[1:]) != inp * k[0] * k[1] or (len(b) == 4 and (b[1], *b[2:]) != (inp, *k)):
                return f"hada_w{n}_b {list(b)} does not fit {inp} inputs with kernel {list(k)}"
        return None
