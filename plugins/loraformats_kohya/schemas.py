"""The pydantic schema of the sd-scripts header entries, imported when something reads it
(`KohyaFormat.metadata_schema`)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from loraformats.deferred import DeferredModel


class KohyaMetadata(DeferredModel):
    """The sd-scripts header entries loraformats reads or updates (all values are strings)."""

    model_config = ConfigDict(extra="allow")

    ss_network_module: str | None = Field(None, description="e.g. networks.lora, lycoris.kohya")
    ss_network_dim: str | None = Field(None, description="rank at training (informational; shapes win)")
    ss_network_alpha: str | None = Field(None, description="alpha at training (informational)")
    ss_network_args: str | None = Field(None, description="JSON of network_args")
    ss_base_model_version: str | None = Field(None, description="sd_v1, sd_v2, sdxl_base_v1-0, ...")
    sshs_model_hash: str | None = Field(None, description="SHA-256 of the data section (recomputed)")
    sshs_legacy_hash: str | None = Field(None, description="AUTOMATIC1111 legacy hash (recomputed)")
