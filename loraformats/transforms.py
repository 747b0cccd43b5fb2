"""Graph edges between canonical forms, and the built-in ones (this module is itself a plugin).

A transform removes one adapter feature a target cannot hold (say a Tucker `mid`) by
re-expressing the adapter, and declares how exact that is.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

from .adapters import Adapter, Exactness, LoRA
from .families import Layer
from .hookspecs import hookimpl
from .tensors import ComputedTensor


class Transform:
    """Base class: `removes` names the adapter feature this edge eliminates."""

    name: ClassVar[str]
    removes: ClassVar[str]
    exactness: ClassVar[Exactness]
    description: ClassVar[str] = ""

    plugin: str = ""

    def applies(self, adapter: Adapter) -> bool:
        return self.removes in adapter.features()

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        raise NotImplementedError


class MergeTuckerMid(Transform):
    """LoRA with a Tucker core -> plain LoRA at the same rank: down' = mid x down, written in fp32."""

    name = "merge-tucker-mid"
    removes = "lora.tucker"
    exactness = Exactness.ROUNDED
    description = "Tucker lora_mid merged into lora_down (same rank; fp32, exact in real arithmetic)"

    def apply(self, adapter: Adapter, layer: Layer) -> Adapter:
        assert isinstance(adapter, LoRA) and adapter.mid is not None
        mid, down = adapter.mid, adapter.down
        shape = (mid.shape[0], down.shape[1], *mid.shape[2:])

        def merged():
            import torch

            core = mid.to_torch().to(torch.float64)
            flat_down = down.to_torch().to(torch.float64).reshape(down.shape[0], -1)
            return torch.einsum("abhw,bi->aihw", core, flat_down).to(torch.float32)

        return replace(adapter, down=ComputedTensor(merged, "F32", shape), mid=None)


@hookimpl
def register_transforms(register) -> None:
    register(MergeTuckerMid())
