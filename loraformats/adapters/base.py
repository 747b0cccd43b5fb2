"""The adapter interface: tensor roles in, a map W -> W' out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum
from math import prod
from typing import TYPE_CHECKING, ClassVar

from ..errors import InvalidFileError, UnsupportedError
from ..families import Layer
from ..tensors import TensorData

if TYPE_CHECKING:
    import torch


class Exactness(str, Enum):
    """How faithful a step is. Ordered from best to worst."""

    IDENTICAL = "identical"  # bytes unchanged: only names, containers or shapes' bookkeeping change
    EXACT = "exact"  # values change representation but not value (e.g. a power-of-two scale fold)
    ROUNDED = "rounded"  # exact in real arithmetic, re-rounded; checked against a float64 reference
    APPROXIMATE = "approximate"  # lossy (e.g. SVD rank reduction); only on request, error reported

    @property
    def rank(self) -> int:
        return list(Exactness).index(self)

    def worst(self, other: Exactness) -> Exactness:
        return self if self.rank >= other.rank else other


class Adapter(ABC):
    """A change to one module. Subclasses are dataclasses of `TensorData` roles."""

    algorithm: ClassVar[str]
    #: True when W' - W does not depend on W (LoRA, LoHa, LoKr, full, norm): `delta` is then defined.
    additive: ClassVar[bool] = False

    @classmethod
    def from_roles(cls, roles: dict[str, TensorData], extras: dict) -> Adapter:
        """Build from a format's tensors by role plus fields it stores elsewhere (`module_extras`)."""
        return cls(**roles, **extras)

    @abstractmethod
    def tensors(self) -> dict[str, TensorData]:
        """Every tensor this adapter holds, by role (so nothing can be dropped unnoticed)."""

    @abstractmethod
    def features(self) -> frozenset[str]:
        """What a target format must support to hold this adapter as it is (e.g. `lora.tucker`)."""

    def apply(self, weight: torch.Tensor, layer: Layer) -> torch.Tensor:
        """W' for a base weight W, computed in the dtype of `weight` (tests use float64).

        Additive adapters add their `delta`; adapters whose change depends on W override this."""
        if not self.additive:
            raise NotImplementedError(f"{self.algorithm} must define apply()")
        return weight + self.delta(layer, weight.dtype)

    def low_rank(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, V) in float64 with W' - W = reshape(U @ V), if the change is low-rank; else None.

        Lets `verify` compare large modules through small QR factorisations instead of dense deltas.
        """
        return None

    def delta(self, layer: Layer, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' - W, for additive adapters only (default float64)."""
        raise NotImplementedError(f"{self.algorithm} depends on the base weight; use apply()")

    def rows(self, start: int, stop: int) -> Adapter:
        """The adapter of output rows [start, stop) alone, exactly, sharing this one's tensors (how a
        fused `qkv` splits into `to_q`, `to_k`, `to_v`). Raises `UnsupportedError` with the reason
        when these tensors cannot express it; callers may re-express the adapter first."""
        raise UnsupportedError(f"{self.algorithm} cannot be split by output rows")

    def bias_delta(self, layer: Layer) -> torch.Tensor | None:
        """b' - b in float64 for adapters that also change the layer's bias (full `diff_b`, norm
        `b_norm`), else None. `Layer` has no bias shape: a bias has one value per output."""
        return None

    @classmethod
    def rank_of(cls, shapes: dict[str, tuple[int, ...]]) -> int | None:
        """The rank a header's shapes give this adapter (what `alpha` is divided by), or None where
        rank means nothing ((IA)3, full, norm, OFT) or is not in the tensors (a full/full LoKr)."""
        return None

    @classmethod
    @abstractmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why these tensors cannot form this adapter on any layer (inconsistent, missing). Header-only."""

    #: The layer kinds this adapter can change, and what is said of another kind ({kind}, {algorithm}).
    targets: ClassVar[tuple[str, ...]] = ("linear", "conv2d")
    wrong_target: ClassVar[str] = "{algorithm} on a {kind} layer is not a valid target"

    @classmethod
    def shape_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        """Why tensors of these shapes cannot adapt `layer`, or None. Works on the header alone:
        the factors must fit each other (`factor_problem`), the layer's kind (`targets`) and its
        geometry (`layer_problem`)."""
        problem = cls.factor_problem(shapes)
        if problem:
            return problem
        if layer.kind not in cls.targets:
            return cls.wrong_target.format(kind=layer.kind, algorithm=cls.algorithm)
        return cls.layer_problem(shapes, layer)

    @classmethod
    @abstractmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        """Why factors that fit each other and the layer's kind do not fit its geometry, or None."""

    def check(self, layer: Layer, where: str) -> None:
        """Raise `InvalidFileError` unless the tensors fit each other and the base layer."""
        problem = self.shape_problem({role: t.shape for role, t in self.tensors().items()}, layer)
        if problem:
            raise InvalidFileError(f"{where}: {problem}")

    @property
    def dtype(self) -> str:
        """The storage dtype that sets how closely a re-rounded copy can match."""
        return next(iter(self.tensors().values())).dtype


def scalar_alpha_problem(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why an `alpha` tensor is not a scalar, or None (also when there is none)."""
    alpha = shapes.get("alpha")
    if alpha is not None and prod(alpha) != 1:
        return f"alpha must be a scalar, got shape {list(alpha)}"
    return None
