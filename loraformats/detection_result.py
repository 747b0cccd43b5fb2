"""The detection result: pydantic models with a published JSON Schema (`specs/detection.schema.json`).

Schema version 1 only ever gains fields: apps read the fields they know and ignore the rest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .deferred import DeferredModel

SCHEMA_VERSION = 1


class Candidate(DeferredModel):
    """One format or family, scored, with the evidence for and against it."""

    name: str
    score: float = Field(description="format: share of tensor names it explains; family: share of modules")
    reasons: list[str] = Field(default_factory=list, description="evidence for")
    against: list[str] = Field(default_factory=list, description="evidence against")


class ComponentSummary(DeferredModel):
    """The modules of one component (UNet, a text encoder) of the pipeline."""

    name: str
    modules: int
    ranks: dict[str, int] = Field(description="rank -> number of modules")
    dtypes: list[str]
    naming: str | None = Field(
        None, description="the family naming the file spells this component's modules in (e.g. ldm)"
    )


class ModuleGroup(DeferredModel):
    """The modules of one block of one component (e.g. unet `down_blocks.1`), in model order."""

    component: str
    block: str = Field(description="module path up to its first index, e.g. down_blocks.1, conv_in")
    modules: int
    ranks: dict[str, int] = Field(description="rank -> number of modules")
    alphas: dict[str, int] = Field(
        default_factory=dict, description="alpha -> number of modules; filled only with read_alphas"
    )
    dtypes: list[str]
    algorithms: list[str]
    kinds: dict[str, int] = Field(description="layer kind (linear, conv2d) -> number of modules")


class Detection(DeferredModel):
    """The answer to "what is this file". `unknown` and `ambiguous` are valid answers."""

    schema_version: Literal[1] = SCHEMA_VERSION
    path: str
    format: str = Field(description="format name, `ambiguous` or `unknown`")
    family: str = Field(description="family name, `ambiguous` or `unknown`")
    variant: str | None = Field(
        None, description="how module names are spelled: `canonical`, or the other namings per component"
    )
    confidence: float = Field(
        0.0,
        description="1.0: one format and one family explain every tensor by name and shape and no metadata "
        "disagrees; 1/n when n candidates tie; x0.9 when metadata contradicts the tensors; 0 when unknown",
    )
    releases: list[str] = Field(
        default_factory=list,
        description="the family's releases the file can be for (e.g. FLUX.1 dev, schnell, Kontext share one "
        "layout); more than one means the header cannot tell them apart",
    )
    algorithms: list[str] = Field(default_factory=list)
    components: list[ComponentSummary] = Field(default_factory=list)
    groups: list[ModuleGroup] = Field(default_factory=list, description="modules by block, in model order")
    alphas: dict[str, int] = Field(
        default_factory=dict,
        description="alpha value -> number of modules; filled only on request (alpha tensors are data)",
    )
    metadata_keys: int = 0
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="the metadata summarised by the format plugins (training settings, trigger_words, ...)",
    )
    contradictions: list[str] = Field(
        default_factory=list, description="metadata claims the tensors disprove (the tensors win)"
    )
    tensors: int = 0
    reasons: list[str] = Field(default_factory=list)
    formats: list[Candidate] = Field(default_factory=list)
    families: list[Candidate] = Field(default_factory=list)
