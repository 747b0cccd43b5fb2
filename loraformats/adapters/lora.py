"""LoRA / LoCon: W' = W + scale * up @ (mid) @ down, with Kohya's alpha semantics."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar

from ..errors import InvalidFileError
from ..families import Layer
from ..tensors import TensorData
from .base import Adapter, scalar_alpha_problem

if TYPE_CHECKING:
    import torch


@dataclass
class LoRA(Adapter):
    """Low-rank factors for Linear, 1x1 and kxk conv (down kxk, up 1x1), with optional Tucker `mid`.

    `alpha` is the original per-module tensor (value and dtype kept for round trips); absent
    means alpha = rank. A stored alpha of 0 also means rank, as in sd-scripts.
    `rank_scaling` is "rank" (scale = alpha / r) or "sqrt_rank" (rsLoRA: alpha / sqrt(r)).
    """

    down: TensorData
    up: TensorData
    mid: TensorData | None = None
    alpha: TensorData | None = None
    rank_scaling: str = "rank"

    algorithm: ClassVar[str] = "lora"
    additive: ClassVar[bool] = True

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def alpha_value(self) -> float:
        value = self.alpha.scalar() if self.alpha is not None else 0.0
        return value if value else float(self.rank)

    @property
    def scale(self) -> float:
        """alpha / r (or alpha / sqrt(r)) in float64."""
        divisor = float(self.rank) if self.rank_scaling == "rank" else float(self.rank) ** 0.5
        return self.alpha_value / divisor

    def tensors(self) -> dict[str, TensorData]:
        roles = {"down": self.down, "up": self.up, "mid": self.mid, "alpha": self.alpha}
        return {role: t for role, t in roles.items() if t is not None}

    def features(self) -> frozenset[str]:
        return frozenset({"lora", "lora.tucker"} if self.mid is not None else {"lora"})

    @property
    def dtype(self) -> str:
        return self.up.dtype

    def rows(self, start: int, stop: int) -> LoRA:
        """Down (and mid) shared whole, up sliced: the rank and scale stay the same."""
        return replace(self, up=self.up.rows(start, stop))

    def low_rank(self, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """scale * up (out, r) and (mid x) down flattened to (r, in * kh * kw), in float64."""
        import torch

        up = self.up.to_torch().to(torch.float64).reshape(self.up.shape[0], -1)
        down = self.down.to_torch().to(torch.float64)
        if self.mid is not None:
            core = self.mid.to_torch().to(torch.float64)
            down = torch.einsum("abhw,bi->aihw", core, down.reshape(down.shape[0], -1))
        return up * self.scale, down.reshape(down.shape[0], -1)

    def delta(self, layer: Layer, dtype: torch.dtype | None = None) -> torch.Tensor:
        """scale * up @ (mid) @ down, shaped like the layer's weight, in `dtype` (default float64)."""
        import torch

        up, down = self.low_rank(layer)
        return (up @ down).reshape(layer.weight_shape).to(dtype or torch.float64)

    @classmethod
    def rank_of(cls, shapes: dict[str, tuple[int, ...]]) -> int | None:
        return shapes["down"][0] if "down" in shapes else None

    @classmethod
    def factor_problem(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """Why these factors cannot form a LoRA whatever the layer (missing, ranks disagree). Header-only."""
        down, up, mid = (shapes.get(role) for role in ("down", "up", "mid"))
        if down is None or up is None:
            return f"needs both down and up factors, has only {', '.join(sorted(shapes))}"
        if len(down) not in (2, 4) or len(up) not in (2, 4) or (mid is not None and len(mid) != 4):
            return f"factors must be 2-D or 4-D, got down {list(down)}, up {list(up)}"
        if down[0] == 0:
            return "rank 0"
        inner = (mid[0], mid[1]) if mid is not None else (down[0], down[0])
        if up[1] != inner[0] or down[0] != inner[1]:
            middle = f", mid {list(mid)}" if mid is not None else ""
            return f"ranks disagree: down {list(down)}, up {list(up)}{middle}"
        return scalar_alpha_problem(shapes)

    wrong_target: ClassVar[str] = "LoRA on a {kind} layer is not a valid target"

    @classmethod
    def layer_problem(cls, shapes: dict[str, tuple[int, ...]], layer: Layer) -> str | None:
        """Why factors of these shapes cannot belong to `layer` (None if they fit). Header-only."""
        down, up, mid = shapes["down"], shapes["up"], shapes.get("mid")
        kernel = tuple(layer.kernel) if layer.kind == "conv2d" else (1, 1)
        r = down[0]
        inner = mid[0] if mid is not None else r
        if up[0] != layer.out_features or up[1] != inner or any(d != 1 for d in up[2:]):
            return f"up {list(up)} does not fit {layer.out_features} outputs at rank {inner}"
        expected_kernel = (1, 1) if mid is not None else kernel
        if down[1] != layer.in_features or tuple(down[2:]) not in ((), expected_kernel):
            return f"down {list(down)} does not fit {layer.in_features} inputs with kernel {list(kernel)}"
        if len(down) == 2 and expected_kernel != (1, 1):
            return f"2-D down {list(down)} on a {list(kernel)} conv"
        if mid is not None and (len(mid) != 4 or mid[1] != r or tuple(mid[2:]) != kernel):
            return f"mid {list(mid)} does not fit rank {r} and kernel {list(kernel)}"
        return None

    def check(self, layer: Layer, where: str) -> None:
        """Raise `InvalidFileError` unless the factors fit each other and the base layer."""
        if self.rank_scaling not in ("rank", "sqrt_rank"):
            raise InvalidFileError(f"{where}: unknown rank scaling {self.rank_scaling!r}")
        super().check(layer, where)
