"""Graph edges between canonical forms, and the built-in ones (this module is itself a plugin).

A transform removes one adapter feature a target cannot hold (say a Tucker `mid`) by
re-expressing the adapter, and declares how exact that is. `removes` names a feature; it also
covers that feature's refinements (`loha` covers `loha.tucker` and `loha.dora`). Transforms on a
LoRA, LoHa or LoKr also apply inside a DoRA wrapper: DoRA's map depends on the inner adapter only
through its delta, so an exact re-expression of the delta keeps the DoRA exact.

Every built-in edge here is exact in real arithmetic; factors are computed in float64 and written
once in float32 (so "rounded", checked against a float64 reference). The one lossy edge, SVD
compression (`SvdCompress`), is not registered: the planner adds it only when the user asks for a
rank or an error bound (`--rank`, `--max-error`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

from .adapters import Adapter, DoRA, Exactness, Full, LoHa, LoKr, LoRA, maths
from .families import Layer
from .hookspecs import hookimpl
from .tensors import ComputedTensor, MemoryTensor, TensorData

if TYPE_CHECKING:
    import torch


class Transform:
    """Base class: `removes` names the adapter feature this edge eliminates."""

    name: ClassVar[str]
    removes: ClassVar[str]
    exactness: ClassVar[Exactness]
    description: ClassVar[str] = ""

    plugin: str = ""

    def removes_feature(self, feature: str) -> bool:
        """Whether this edge can take `feature` away (the feature itself or one of its refinements)."""
        return feature == self.removes or feature.startswith(self.removes + ".")

    def applies(self, adapter: Adapter) -> bool:
        return any(self.removes_feature(feature) for feature in adapter.features())

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        raise NotImplementedError


def on_inner(adapter: Adapter, kind: type[Adapter], change: Callable[[Adapter], Adapter]) -> Adapter:
    """Apply `change` to `adapter`, or to the inner adapter of a DoRA around one of `kind`."""
    if isinstance(adapter, DoRA) and isinstance(adapter.inner, kind):
        return replace(adapter, inner=change(adapter.inner))
    assert isinstance(adapter, kind), (adapter, kind)
    return change(adapter)


def inner_of(adapter: Adapter) -> Adapter:
    return adapter.inner if isinstance(adapter, DoRA) else adapter


def f32_tensor(compute: Callable[[], torch.Tensor], shape: tuple[int, ...]) -> TensorData:
    """A float32 tensor computed (in float64, rounded once) only when written or read."""

    def rounded():
        import torch

        return compute().reshape(shape).to(torch.float32)

    return ComputedTensor(rounded, "F32", shape)


Factors = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]


def lora_from_factors(factors: Factors, rank: int, layer: Layer) -> LoRA:
    """A plain LoRA (scale 1, no alpha) whose float32 factors are `factors()` = (up, down) of the
    flattened delta, shaped for the layer; computed once, lazily, for both tensors."""
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def pair() -> tuple[torch.Tensor, torch.Tensor]:
        if "pair" not in cache:
            cache["pair"] = factors()
        return cache["pair"]

    conv = layer.kind == "conv2d"
    kh, kw = maths.kernel(layer)
    up_shape = (layer.out_features, rank, 1, 1) if conv else (layer.out_features, rank)
    down_shape = (rank, layer.in_features, kh, kw) if conv else (rank, layer.in_features)
    return LoRA(
        down=f32_tensor(lambda: pair()[1], down_shape),
        up=f32_tensor(lambda: pair()[0], up_shape),
    )


def dense_lora(adapter: Adapter, layer: Layer) -> LoRA:
    """The exact rank-min(O, I·kh·kw) LoRA of an additive adapter: (I, ΔW) or (ΔW, I), no decomposition."""
    rank = min(layer.out_features, maths.flat_in(layer))

    def factors():
        dense = adapter.delta(layer)
        return maths.identity_factors(dense.reshape(layer.out_features, -1))

    return lora_from_factors(factors, rank, layer)


class MergeTuckerMid(Transform):
    """LoRA with a Tucker core -> plain LoRA at the same rank: down' = mid x down, written in fp32."""

    name = "merge-tucker-mid"
    removes = "lora.tucker"
    exactness = Exactness.ROUNDED
    description = "Tucker lora_mid merged into lora_down (same rank; fp32, exact in real arithmetic)"

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        return on_inner(adapter, LoRA, self._merge)

    @staticmethod
    def _merge(adapter: LoRA) -> LoRA:
        assert adapter.mid is not None
        mid, down = adapter.mid, adapter.down
        shape = (mid.shape[0], down.shape[1], *mid.shape[2:])

        def merged():
            import torch

            core = mid.to_torch().to(torch.float64)
            flat_down = down.to_torch().to(torch.float64).reshape(down.shape[0], -1)
            return torch.einsum("abhw,bi->aihw", core, flat_down).to(torch.float32)

        return replace(adapter, down=ComputedTensor(merged, "F32", shape), mid=None)


class LohaToLora(Transform):
    """LoHa -> LoRA, exactly: (A1 B1) ⊙ (A2 B2) = face-split(A1, A2) · Khatri–Rao(B1, B2).

    Rank r1·r2 while that is below min(O, I·kh·kw); a Tucker LoHa keeps a Tucker core T1 ⊗ T2
    on the rank axes (a later edge merges it if the target needs). At or above the cap the delta
    itself is not low-rank and the LoRA is (I, ΔW) or (ΔW, I) at rank min(O, I·kh·kw), still exact.
    """

    name = "loha-to-lora"
    removes = "loha"
    exactness = Exactness.ROUNDED
    description = (
        "LoHa re-expressed as LoRA: up = row-wise face-splitting product, down = Khatri–Rao product "
        "(rank r1·r2, capped exactly at min(out, in·k·k)); fp32, exact in real arithmetic"
    )

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        return on_inner(adapter, LoHa, lambda loha: self.convert(loha, layer))

    @staticmethod
    def convert(loha: LoHa, layer: Layer) -> LoRA:
        r1, r2 = loha.ranks
        rank = r1 * r2
        if rank >= min(layer.out_features, maths.flat_in(layer)):
            return dense_lora(loha, layer)
        if not loha.tucker:
            return lora_from_factors(lambda: loha.lora_factors(layer), rank, layer)

        def up():
            a1, a2 = maths.f64(loha.hada_w1_a), maths.f64(loha.hada_w2_a)
            return maths.face_split(a1.T, a2.T) * loha.scale

        def mid():
            t1, t2 = maths.f64(loha.hada_t1), maths.f64(loha.hada_t2)
            kh, kw = t1.shape[2:]
            return (t1[:, None, :, None] * t2[None, :, None, :]).reshape(rank, rank, kh, kw)

        def down():
            return maths.khatri_rao(maths.f64(loha.hada_w1_b), maths.f64(loha.hada_w2_b))

        kh, kw = maths.kernel(layer)
        return LoRA(
            down=f32_tensor(down, (rank, layer.in_features, 1, 1)),
            up=f32_tensor(up, (layer.out_features, rank, 1, 1)),
            mid=f32_tensor(mid, (rank, rank, kh, kw)),
        )


class LokrToLora(Transform):
    """LoKr -> LoRA, exactly: with W1 = U1 V1 and flatten(W2) = U2 V2,
    flatten(W1 ⊗ W2) = (U1 ⊗ U2)(V1 ⊗ V2) (mixed-product rule; conv: flatten(ΔW) = W1 ⊗ flatten(W2)).

    A full factor pairs with an identity on its smaller side. Rank = product of the inner sizes
    while below min(O, I·kh·kw), else the exact (I, ΔW) / (ΔW, I) form. No SVD.
    """

    name = "lokr-to-lora"
    removes = "lokr"
    exactness = Exactness.ROUNDED
    description = (
        "LoKr re-expressed as LoRA: up = U1 ⊗ U2, down = V1 ⊗ V2 (no SVD; capped exactly at "
        "min(out, in·k·k)); fp32, exact in real arithmetic"
    )

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        return on_inner(adapter, LoKr, lambda lokr: self.convert(lokr, layer))

    @staticmethod
    def convert(lokr: LoKr, layer: Layer) -> LoRA:
        first, second = lokr.inner_sizes(layer)
        rank = first * second
        if rank >= min(layer.out_features, maths.flat_in(layer)):
            return dense_lora(lokr, layer)
        return lora_from_factors(lambda: lokr.lora_factors(layer), rank, layer)


class BakeLokrScale(Transform):
    """A full/full LoKr with PEFT's alpha/r scale -> the same LoKr with the scale folded into lokr_w1,
    for tools that apply scale 1 to two full factors (LyCORIS, ComfyUI, A1111, Forge)."""

    name = "bake-lokr-scale"
    removes = "lokr.scaled_full"
    exactness = Exactness.ROUNDED
    description = "PEFT's alpha/r on a LoKr with two full factors folded into lokr_w1 (fp32)"

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        return on_inner(adapter, LoKr, self._bake)

    @staticmethod
    def _bake(lokr: LoKr) -> LoKr:
        scale, w1 = lokr.scale, lokr.lokr_w1
        stated = float(lokr.peft_rank or 1)  # LyCORIS ignores it but needs one (it writes its lora_dim)

        return replace(
            lokr,
            lokr_w1=f32_tensor(lambda: maths.f64(w1) * scale, w1.shape),
            alpha=MemoryTensor.f32(stated),
            convention="lycoris",
            peft_rank=None,
        )


class FullToLora(Transform):
    """A full weight delta -> LoRA (I, diff) or (diff, I) at rank min(O, I·kh·kw): the diff's own
    bytes become one factor and an identity in its dtype the other, so nothing is re-rounded.
    A bias delta (`diff_b`) has no LoRA form; such modules are refused, never truncated."""

    name = "full-to-lora"
    removes = "full"
    exactness = Exactness.EXACT
    description = "full diff as a LoRA with an identity factor (rank min(out, in·k·k); values unchanged)"

    def applies(self, adapter: Adapter) -> bool:
        return isinstance(adapter, Full) and adapter.diff_b is None

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        assert isinstance(adapter, Full)
        diff, dtype = adapter.diff, adapter.diff.dtype
        rows, cols = layer.out_features, maths.flat_in(layer)
        conv = layer.kind == "conv2d"
        kh, kw = maths.kernel(layer)
        rank = min(rows, cols)

        def eye():
            import torch

            from .tensors import torch_dtype

            return torch.eye(rank, dtype=torch_dtype(dtype))

        identity = ComputedTensor(eye, dtype, (rank, rank))
        if rows <= cols:
            up = identity.reshaped((rows, rank, 1, 1)) if conv else identity
            return LoRA(down=diff.reshaped((rank, layer.in_features, kh, kw)) if conv else diff, up=up)
        down = identity.reshaped((rank, layer.in_features, kh, kw)) if conv else identity
        return LoRA(down=down, up=diff.reshaped((rows, rank, 1, 1)) if conv else diff)


#: The built-in edges, in the order the planner tries them when two are equally good.
BUILTIN: tuple[Transform, ...] = (MergeTuckerMid(), BakeLokrScale(), LohaToLora(), LokrToLora(), FullToLora())


@hookimpl
def register_transforms(register) -> None:
    for transform in BUILTIN:
        register(transform)


class SvdCompress(Transform):
    """Any additive change (LoRA, LoHa, LoKr, full) -> LoRA of at most `rank`, or of the least rank whose
    relative error is at most `max_error`: truncated SVD, float32 factors, error measured per module.

    Not registered: the planner creates one when the user asks (`--rank N`, `--max-error E`). A LoRA
    already at or below `rank` (and no error bound asked) is kept as it is. Inside a DoRA the inner
    delta is compressed and its error is the one reported.
    """

    name = "svd-compress"
    removes = "lossy"
    exactness = Exactness.APPROXIMATE
    description = "truncated SVD to a lower-rank LoRA (float32); relative error reported per module"

    def __init__(self, rank: int | None = None, max_error: float | None = None) -> None:
        if rank is None and max_error is None:
            raise ValueError("svd-compress needs a rank or an error bound")
        self.rank, self.max_error = rank, max_error
        self.description = self._describe()

    def _describe(self) -> str:
        asked = [f"rank <= {self.rank}"] if self.rank is not None else []
        asked += [f"relative error <= {self.max_error:g}"] if self.max_error is not None else []
        return f"truncated SVD to a LoRA with {' and '.join(asked)} (float32 factors)"

    def applies(self, adapter: Adapter) -> bool:
        inner = inner_of(adapter)
        if isinstance(inner, Full):
            return inner.diff_b is None  # a bias delta has no LoRA form
        if not isinstance(inner, (LoRA, LoHa, LoKr)):
            return False
        if isinstance(inner, LoRA) and self.max_error is None:
            return self.rank is not None and inner.rank > self.rank
        return True

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        return self.compress(adapter, layer)[0]

    def compress(self, adapter: Adapter, layer: Layer):
        """(the compressed adapter, its `Truncation`) — computed now, so the error can be reported."""
        from .adapters.svd import truncate
        from .tensors import MemoryTensor

        inner = inner_of(adapter)
        cut = truncate(inner, layer, self.rank, self.max_error)
        conv = layer.kind == "conv2d"
        kh, kw = maths.kernel(layer)
        up_shape = (layer.out_features, cut.rank, 1, 1) if conv else (layer.out_features, cut.rank)
        down_shape = (cut.rank, layer.in_features, kh, kw) if conv else (cut.rank, layer.in_features)
        lora = LoRA(
            down=MemoryTensor.from_torch(cut.down.reshape(down_shape).contiguous()),
            up=MemoryTensor.from_torch(cut.up.reshape(up_shape).contiguous()),
        )
        result = replace(adapter, inner=lora) if isinstance(adapter, DoRA) else lora
        return result, cut
