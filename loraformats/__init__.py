"""loraformats: convert LoRA weights between formats, exactly and with proof.

The public API loads lazily so that `import loraformats` stays cheap (and never imports torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    InvalidFileError,
    LoraFormatsError,
    OutputError,
    UnsupportedError,
    UsageError,
    VerificationError,
)
from .hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "load": "conversion", "convert": "conversion", "detect": "detection", "verify": "verification",
    "AdapterSet": "canonical", "Family": "families", "Component": "families", "Layer": "families",
    "Format": "formats", "Evidence": "formats", "ParsedFile": "formats", "ParsedModule": "formats",
    "Encoded": "formats", "Transform": "transforms", "Detection": "detection", "ConversionReport": "report",
    "registry": "plugins",
}  # fmt: skip

__all__ = [
    "AdapterSet", "Component", "ConversionReport", "Detection", "Encoded", "Evidence", "Family", "Format",
    "InvalidFileError", "Layer", "LoraFormatsError", "OutputError", "ParsedFile", "ParsedModule", "Transform",
    "UnsupportedError", "UsageError", "VerificationError", "__version__", "convert", "detect", "hookimpl",
    "load", "registry", "verify",
]  # fmt: skip

if TYPE_CHECKING:
    from .canonical import AdapterSet
    from .conversion import convert, load
    from .detection import Detection, detect
    from .families import Component, Family, Layer
    from .formats import Encoded, Evidence, Format, ParsedFile, ParsedModule
    from .plugins import registry
    from .report import ConversionReport
    from .transforms import Transform
    from .verification import verify


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'loraformats' has no attribute {name!r}")
