"""Canonical adapters: one class per algorithm, each owning its tensor roles and its maths."""

from .base import Adapter, Exactness
from .dora import DoRA
from .full import Full
from .glora import GLoRA
from .ia3 import IA3
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .norm import Norm
from .oft import BOFT, DiagOFT

#: Algorithms by name. Formats build adapters through this table, never by importing classes ad hoc.
ALGORITHMS: dict[str, type[Adapter]] = {
    cls.algorithm: cls for cls in (LoRA, DoRA, LoHa, LoKr, IA3, Full, Norm, GLoRA, DiagOFT, BOFT)
}

__all__ = [
    "ALGORITHMS", "BOFT", "IA3", "Adapter", "DiagOFT", "DoRA", "Exactness", "Full", "GLoRA", "LoHa", "LoKr",
    "LoRA", "Norm",
]  # fmt: skip
