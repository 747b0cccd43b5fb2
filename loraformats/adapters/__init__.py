"""Canonical adapters: one class per algorithm, each owning its tensor roles and its maths."""

from .base import Adapter, Exactness
from .dora import DoRA
from .lora import LoRA

#: Algorithms by name. Formats build adapters through this table, never by importing classes ad hoc.
ALGORITHMS: dict[str, type[Adapter]] = {cls.algorithm: cls for cls in (LoRA, DoRA)}

__all__ = ["ALGORITHMS", "Adapter", "DoRA", "Exactness", "LoRA"]
