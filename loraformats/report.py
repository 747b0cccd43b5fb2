"""What loraformats reports: plan steps and conversion results.

Plain dataclasses (`Document`): every conversion builds one, and they import pydantic only to dump
themselves as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .adapters.base import Exactness
from .document import Document


@dataclass(kw_only=True)
class Step(Document):
    """One step of a conversion plan and how faithful it is."""

    stage: Literal["read", "drop", "transform", "write"]
    name: str
    exactness: Exactness
    modules: int = 0
    detail: str = ""


@dataclass(kw_only=True)
class ModuleApproximation(Document):
    """One compressed module: the rank written and its measured relative error
    (‖ΔW − up·down‖_F / ‖ΔW‖_F on the float32 factors written)."""

    rank: int
    relative_error: float


@dataclass(kw_only=True)
class Approximation(Document):
    """What a lossy compression did: per module, and over all compressed modules together."""

    rank: int | None = None  # the rank asked for (--rank)
    max_error: float | None = None  # the relative error bound asked for (--max-error)
    modules: dict[str, ModuleApproximation] = field(default_factory=dict)
    relative_error: float = 0.0  # sqrt(Σ‖E_m‖²) / sqrt(Σ‖ΔW_m‖²) over compressed modules
    max_relative_error: float = 0.0
    kept: int = 0  # additive modules already within the asked rank, kept exactly


@dataclass(kw_only=True)
class ConversionReport(Document):
    """The result of `convert` (also printed by `--report json`)."""

    schema_version: Literal[1] = 1
    input: str
    output: str | None
    source_format: str
    target_format: str
    family: str
    modules: int
    tensors_written: int = 0
    bytes_written: int = 0
    dry_run: bool = False
    exactness: Exactness
    steps: list[Step] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    approximation: Approximation | None = None  # what --rank / --max-error compressed
    #: every tensor left out on request (--drop-component), as "component:path role"
    dropped: list[str] = field(default_factory=list)
