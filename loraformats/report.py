"""Pydantic models of what loraformats reports: plan steps and conversion results."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .adapters.base import Exactness
from .deferred import DeferredModel


class Step(DeferredModel):
    """One step of a conversion plan and how faithful it is."""

    stage: Literal["read", "drop", "transform", "write"]
    name: str
    exactness: Exactness
    modules: int = 0
    detail: str = ""


class ModuleApproximation(DeferredModel):
    """One compressed module: the rank written and its measured relative error."""

    rank: int
    relative_error: float = Field(description="‖ΔW − up·down‖_F / ‖ΔW‖_F on the float32 factors written")


class Approximation(DeferredModel):
    """What a lossy compression did: per module, and over all compressed modules together."""

    rank: int | None = Field(None, description="the rank asked for (--rank)")
    max_error: float | None = Field(None, description="the relative error bound asked for (--max-error)")
    modules: dict[str, ModuleApproximation] = Field(default_factory=dict)
    relative_error: float = Field(0.0, description="sqrt(Σ‖E_m‖²) / sqrt(Σ‖ΔW_m‖²) over compressed modules")
    max_relative_error: float = 0.0
    kept: int = Field(0, description="additive modules already within the asked rank, kept exactly")


class ConversionReport(DeferredModel):
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
    steps: list[Step] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    approximation: Approximation | None = Field(None, description="what --rank / --max-error compressed")
    dropped: list[str] = Field(
        default_factory=list,
        description='every tensor left out on request (--drop-component), as "component:path role"',
    )
