"""Pydantic models of what loraformats reports: plan steps and conversion results."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from .adapters.base import Exactness


class Step(BaseModel):
    """One step of a conversion plan and how faithful it is."""

    stage: Literal["read", "transform", "write"]
    name: str
    exactness: Exactness
    modules: int = 0
    detail: str = ""


class ConversionReport(BaseModel):
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
