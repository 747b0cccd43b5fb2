"""`inspect`: a readable report of a LoRA file from its header alone (modules by block, metadata, size)."""

from __future__ import annotations

import os

from pydantic import BaseModel

from .detection import Detection, detect


class Inspection(BaseModel):
    schema_version: int = 1
    detection: Detection


def inspect(path: str | os.PathLike, *, allow_pickle: bool = False) -> Inspection:
    return Inspection(detection=detect(path, allow_pickle=allow_pickle))


def render(report: Inspection) -> str:
    result = report.detection
    return f"{result.path}: {result.format}, {result.family}"
