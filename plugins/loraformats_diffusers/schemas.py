"""The pydantic schema of a diffusers LoRA file's header entries, imported when something reads it
(`DiffusersFormat.metadata_schema`)."""

from __future__ import annotations

from pydantic import Field

from loraformats.deferred import DeferredModel


class DiffusersMetadata(DeferredModel):
    """Header entries of a diffusers LoRA file."""

    format: str | None = Field(None, description="'pt', written by diffusers")
    lora_adapter_metadata: str | None = Field(
        None, description="JSON of LoraConfig fields, each prefixed with its component ('unet.r', ...)"
    )
