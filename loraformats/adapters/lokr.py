"""LoKr (LyCORIS `algo=lokr`, PEFT `LoKrConfig`): ΔW = γ · W1 ⊗ W2.

W1 (a, c) is `lokr_w1` or `lokr_w1_a @ lokr_w1_b`; W2 (b, d[, kh, kw]) is `lokr_w2`, or
`lokr_w2_a @ lokr_w2_b` (conv: `lokr_w2_b` is (r, d·kh·kw)), or Tucker
W2[p, q, h, w] = Σ_{x,y} T[x, y, h, w] A[x, p] B[y, q] with `lokr_w2_a` (r, b), `lokr_w2_b` (r, d),
`lokr_t2` (r, r, kh, kw). Conv: W1 gets trailing unit dims, so ΔW has shape (a·b, c·d, kh, kw).

γ = alpha / r with r from the decomposed factor (`lokr_w2_b`, else `lokr_w1_b`; ComfyUI's order).
When *both* factors are full the tools disagree, so the convention is a field:
- `"lycoris"`: LyCORIS, ComfyUI, A1111 and Forge use scale 1 and ignore alpha (LyCORIS writes
  alpha = its lora_dim);
- `"peft"`: PEFT uses alpha / r, where r is the `r` its config gives the module (`peft_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import TYPE_CHECKING, ClassVar

from ..errors import InvalidFileError, UnsupportedError
from ..families import Layer
from ..tensors import TensorData
from . import maths
from .base import Adapter, scalar_alpha_problem

if TYPE_CHECKING:
    import torch

ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha")
CONVENTIONS = ("lycoris", "peft")
Pair = tuple["torch.Tensor", "torch.Tensor"]


@dataclass
class LoKr(Adapter):
    """A Kronecker product of a small factor and a (possibly low-rank or Tucker) large factor."""

    lokr_w1: TensorData | None = None
    lokr_w1_a: TensorData | None = None
    lokr_w1_b: TensorData | None = None
    lokr_w2: TensorData | None = None
    lokr_w2_a: TensorData | None = None
    lokr_w2_b: TensorData | None = None
    lokr_t2: TensorData | None = None
    alpha: TensorData | None = None
    convention: str = "lycoris"
    peft_rank: int | None = None

    algorithm: ClassVar[str] = "lokr"
    additive: ClassVar[bool] = True

    @property
    def full(self) -> bool:
        """Both factors stored whole: the case where the scale conventions differ."""
        return self.lokr_w1 is not None and self.lokr_w2 is not None

    @property
    def rank(self) -> int | None:
        """The rank of the decomposed factor (w2's, else w1's); None when both are full."""
        for factor in (self.lokr_w2_b, self.lokr_w1_b):
            if factor is not None:
                return factor.shape[0]
        return None

    @property
    def scale(self) -> float:
        if not self.full:
            return maths.alpha_scale(self.alpha, self.rank)
        if self.convention == "lycoris" or self.alpha is None:
            return 1.0
        return self.alpha.scalar() / float(self.peft_rank or 1)

    def tensors(self) -> dict[str, TensorData]:
        roles = {name: getattr(self, name) for name in ROLES}
        return {role: t for role, t in roles.items() if t is not None}

    def features(self) -> frozenset[str]:
        features = {"lokr"}
        if self.lokr_t2 is not None:
            features.add("lokr.tucker")
        if self.full and self.convention == "peft" and self.scale != 1.0:
            features.add("lokr.scaled_full")  # only PEFT can state a scale on two full factors
        return frozenset(features)

    def rows(self, start: int, stop: int) -> LoKr:
        """kron(w1, w2) rows [start, stop) are kron(w1 rows, w2) when both ends are multiples of w2's
        row count; other splits cut through Kronecker blocks (re-express as LoRA first)."""
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a
        if self.lokr_t2 is not None or w2 is None:
            raise UnsupportedError("a Tucker LoKr cannot be split by output rows")
        block = w2.shape[0]
        if start % block or stop % block:
            raise UnsupportedError(
                f"rows [{start}, {stop}) cut through LoKr's Kronecker blocks of {block} rows"
            )
        if self.lokr_w1 is not None:
            return replace(self, lokr_w1=self.lokr_w1.rows(start // block, stop // block))
        assert self.lokr_w1_a is not None
        return replace(self, lokr_w1_a=self.lokr_w1_a.rows(start // block, stop // block))

    @property
    def dtype(self) -> str:
        return next(t for t in (self.lokr_w1, self.lokr_w1_a) if t is not None).dtype

    def factors(self, layer: Layer, dtype: torch.dtype | None = None) -> tuple[Pair, Pair]:
        """((U1, V1), (U2, V2)) with W1 = U1 V1 (a, c) and flatten(W2) = U2 V2 (b, d·kh·kw), float64.

        A full factor is paired with an identity on its smaller side, so the inner sizes are as small
        as they can be without any decomposition.
        """
        if self.lokr_w1 is not None:
            first = _full_pair(maths.f64(self.lokr_w1, dtype))
        else:
            first = (maths.f64(self.lokr_w1_a, dtype), maths.f64(self.lokr_w1_b, dtype))
        if self.lokr_w2 is not None:
            w2 = maths.f64(self.lokr_w2, dtype)
            second = _full_pair(w2.reshape(w2.shape[0], -1))
        elif self.lokr_t2 is not None:
            a, b, core = (maths.f64(t, dtype) for t in (self.lokr_w2_a, self.lokr_w2_b, self.lokr_t2))
            second = (a.T, maths.tucker_flat(core, b))
        else:
            a, b = maths.f64(self.lokr_w2_a, dtype), maths.f64(self.lokr_w2_b, dtype)
            second = (a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
        return first, second

    def lora_factors(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 (up, down) of `low_rank`, for writing: Kronecker products of float16/bfloat16
        values (or of a value and an identity's 0/1) are exact in float32, so those are formed in float32
        directly; a Tucker factor (sums) in float64, rounded once. The scale goes in once."""
        import torch

        narrow = self.lokr_t2 is None and all(t.dtype in maths.NARROW for t in self.tensors().values()
                                               if t is not self.alpha)  # fmt: skip
        (u1, v1), (u2, v2) = self.factors(layer, torch.float32 if narrow else torch.float64)
        return maths.scaled_f32(maths.kron(u1, u2), maths.kron(v1, v2), self.scale)

    def inner_sizes(self, layer: Layer) -> tuple[int, int]:
        """The inner sizes of `factors` (from shapes alone): the rank of the exact LoRA is their product."""
        first = min(self.lokr_w1.shape) if self.lokr_w1 is not None else self.lokr_w1_a.shape[1]
        if self.lokr_w2 is not None:
            second = min(self.lokr_w2.shape[0], prod(self.lokr_w2.shape[1:]))
        elif self.lokr_t2 is not None:
            second = self.lokr_t2.shape[0]
        else:
            second = self.lokr_w2_a.shape[1]
        return first, second

    def low_rank(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """flatten(ΔW) = γ (U1 ⊗ U2)(V1 ⊗ V2), by the mixed-product rule (no SVD); None when the
        inner size is not below min(O, I·kh·kw) (the dense delta is then smaller)."""
        first, second = self.inner_sizes(layer)
        if first * second >= min(layer.out_features, maths.flat_in(layer)):
            return None
        (u1, v1), (u2, v2) = self.factors(layer)
        return maths.kron(u1, u2) * self.scale, maths.kron(v1, v2)

    def delta(self, layer: Layer, dtype: torch.dtype | None = None) -> torch.Tensor:
        import torch

        (u1, v1), (u2, v2) = self.factors(layer)
        product = maths.kron(u1 @ v1, u2 @ v2) * self.scale
        return product.reshape(layer.weight_shape).to(dtype or torch.float64)

    @classmethod
    def rank_of(cls, shapes: dict[str, tuple[int, ...]]) -> int | None:
        return next((shapes[role][0] for role in ("lokr_w2_b", "lokr_w1_b") if role in shapes), None)

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        w1, w1a, w1b = (shapes.get(f"lokr_w1{s}") for s in ("", "_a", "_b"))
        w2, w2a, w2b, t2 = (shapes.get(f"lokr_{s}") for s in ("w2", "w2_a", "w2_b", "t2"))
        if (w1 is None) == (w1a is None and w1b is None) or (w1 is None and (w1a is None or w1b is None)):
            return "a LoKr module needs lokr_w1, or lokr_w1_a and lokr_w1_b (not both)"
        if (w2 is None) == (w2a is None and w2b is None) or (w2 is None and (w2a is None or w2b is None)):
            return "a LoKr module needs lokr_w2, or lokr_w2_a and lokr_w2_b (not both)"
        if t2 is not None and w2 is not None:
            return "lokr_t2 without lokr_w2_a / lokr_w2_b"
        if problem := scalar_alpha_problem(shapes):
            return problem
        if w1 is not None and len(w1) != 2:
            return f"lokr_w1 must be 2-D, got {list(w1)}"
        if w1 is None and (len(w1a) != 2 or len(w1b) != 2 or w1a[1] != w1b[0]):
            return f"ranks disagree: lokr_w1_a {list(w1a)}, lokr_w1_b {list(w1b)}"
        if w2 is not None and len(w2) not in (2, 4):
            return f"lokr_w2 must be 2-D or 4-D, got {list(w2)}"
        if t2 is not None:
            if len(t2) != 4 or len(w2a) != 2 or len(w2b) != 2 or (t2[0], t2[1]) != (w2a[0], w2b[0]):
                return f"Tucker lokr_t2 {list(t2)} does not fit {list(w2a)} and {list(w2b)}"
        elif w2 is None and (len(w2a) != 2 or len(w2b) not in (2, 4) or w2a[1] != w2b[0]):
            return f"ranks disagree: lokr_w2_a {list(w2a)}, lokr_w2_b {list(w2b)}"
        return None

    wrong_target: ClassVar[str] = "LoKr on a {kind} layer is not a valid target"

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        k = maths.kernel(layer)
        w1, w1a, w1b = (shapes.get(f"lokr_w1{s}") for s in ("", "_a", "_b"))
        w2, w2a, w2b, t2 = (shapes.get(f"lokr_{s}") for s in ("w2", "w2_a", "w2_b", "t2"))
        a, c = w1 if w1 is not None else (w1a[0], w1b[1])
        if w2 is not None:
            b, d = w2[:2]
            kernel_ok = tuple(w2[2:]) == k or (k == (1, 1) and len(w2) == 2)
        elif t2 is not None:
            b, d = w2a[1], w2b[1]
            kernel_ok = layer.kind == "conv2d" and tuple(t2[2:]) == k
        else:
            b, flat = w2a[0], prod(w2b[1:])
            d, rest = divmod(flat, k[0] * k[1])
            kernel_ok = rest == 0 and (len(w2b) == 2 or tuple(w2b[2:]) == k)
        if a * b != layer.out_features or c * d != layer.in_features or not kernel_ok:
            return f"Kronecker factors ({a}x{c}) ⊗ ({b}x{d}) do not fit {list(layer.weight_shape)}"
        return None

    def check(self, layer: Layer, where: str) -> None:
        if self.convention not in CONVENTIONS:
            raise InvalidFileError(f"{where}: unknown LoKr scale convention {self.convention!r}")
        super().check(layer, where)


def _full_pair(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) = (M, I) or (I, M), whichever has the smaller inner size."""
    import torch

    rows, cols = matrix.shape
    if cols <= rows:
        return matrix, torch.eye(cols, dtype=matrix.dtype)
    return torch.eye(rows, dtype=matrix.dtype), matrix
