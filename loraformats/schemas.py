"""How format plugins declare their schemas without making every command import pydantic.

- Write options (`Format.options_schema`) subclass `Options`, which makes each subclass a dataclass:
  a conversion builds one on every run, and the defaults cost nothing; pydantic validates `--set`
  values against it, and describes it, only when asked.
- Metadata schemas (`Format.metadata_schema`) are pydantic models, named with `on_demand` so that
  their module (and pydantic) is imported the first time something reads them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

from .document import Document


class Options(Document):
    """Base of a format's write options. Every subclass becomes a keyword-only dataclass (do not
    decorate it again: that would drop the descriptions); declare each field with
    `option(default, "what it does")`. Unknown options are refused."""

    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(kw_only=True)(cls)

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]:
        schema = super().model_json_schema()
        for item in dataclasses.fields(cls):
            if "description" in item.metadata:
                schema["properties"][item.name]["description"] = item.metadata["description"]
        return schema


def option(default: Any, description: str) -> Any:
    """A write option's field: its default and what it does."""
    return dataclasses.field(default=default, metadata={"description": description})


class on_demand:
    """A class attribute named "module:attribute", imported the first time it is read, e.g.
    `metadata_schema = on_demand("loraformats_kohya.schemas:KohyaMetadata")`."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.value: Any = None

    def __get__(self, instance: object, owner: type) -> Any:
        if self.value is None:
            module, _, attribute = self.target.partition(":")
            self.value = getattr(importlib.import_module(module), attribute)
        return self.value


def schema_fields(schema: type) -> dict[str, dict[str, Any]]:
    """Each field of a schema (pydantic model or `Options`) with its JSON-schema entry (`default`,
    `description`, ...), in declaration order."""
    return dict(schema.model_json_schema().get("properties", {}))
