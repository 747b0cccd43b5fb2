"""The pydantic schemas of the dialects' header entries, imported when something reads them."""

from __future__ import annotations

from pydantic import Field

from loraformats.deferred import DeferredModel


class AiToolkitMetadata(DeferredModel):
    """The header entry ai-toolkit writes (its files carry no `lora_adapter_metadata`)."""

    software: str | None = Field(
        None, description='JSON: {"name": "ai-toolkit", "repo": ..., "version": ...}'
    )
