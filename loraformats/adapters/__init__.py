"""Canonical adapters: one class per algorithm, each owning its tensor roles and its maths."""

from .base import Adapter, Exactness
from .lora import LoRA

#: Algorithms by name. Formats build adapters through this table, never by importing classes ad hoc.
ALGORITHMS: dict[str, type[Adapter]] = {LoRA.algorithm: LoRA}

__all__ = ["ALGORITHMS", "Adapter", "Exactness", "LoRA"]
