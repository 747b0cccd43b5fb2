"""Plain dataclasses that dump and describe themselves the way pydantic models do.

A conversion builds its report on every run, and importing pydantic costs about 60 ms: more than
the rest of a conversion's start-up. These classes import it only when asked for JSON or a schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import TypeAdapter

_ADAPTERS: dict[type, TypeAdapter] = {}


class Document:
    """Base of a dataclass: `model_dump`, `model_dump_json`, `model_validate` and
    `model_json_schema`, through a pydantic `TypeAdapter` built on first use."""

    @classmethod
    def _adapter(cls) -> TypeAdapter:
        adapter = _ADAPTERS.get(cls)
        if adapter is None:
            from pydantic import TypeAdapter

            adapter = _ADAPTERS[cls] = TypeAdapter(cls)
        return adapter

    def model_dump(self, *, mode: str = "python", **options: Any) -> dict[str, Any]:
        return self._adapter().dump_python(self, mode=mode, **options)

    def model_dump_json(self, *, indent: int | None = None, **options: Any) -> str:
        return self._adapter().dump_json(self, indent=indent, **options).decode()

    @classmethod
    def model_validate(cls, value: Any, **options: Any) -> Any:
        return cls._adapter().validate_python(value, **options)

    @classmethod
    def model_json_schema(cls) -> dict[str, Any]:
        return cls._adapter().json_schema()
