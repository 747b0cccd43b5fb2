"""The base of every pydantic model loraformats and its plugins declare."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class DeferredModel(BaseModel):
    """A pydantic model whose validator is built on first use, not at import: every command imports
    every plugin's schemas, and building them all would cost more than most commands take."""

    model_config = ConfigDict(defer_build=True)
