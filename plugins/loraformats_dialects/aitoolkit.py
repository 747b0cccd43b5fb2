"""ai-toolkit (ostris): diffusers names and PEFT factors, no alpha, its `software` metadata entry.

ai-toolkit loads no `lora_adapter_metadata`, so every scale is folded into the up factors (exact
for powers of two, float32 otherwise). Files are told apart from diffusers' own by `software`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from loraformats.canonical import AdapterSet
from loraformats.formats import Encoded, Evidence
from loraformats.header import Header
from loraformats.schemas import on_demand, option
from loraformats_diffusers.format import DiffusersFormat, DiffusersOptions

SOFTWARE_KEY = "software"
SOFTWARE = {"name": "ai-toolkit", "repo": "https://github.com/ostris/ai-toolkit"}


def written_by_ai_toolkit(metadata: dict[str, str]) -> bool:
    try:
        software = json.loads(metadata.get(SOFTWARE_KEY, "{}"))
    except ValueError:
        return False
    return isinstance(software, dict) and software.get("name") == "ai-toolkit"


class AiToolkitOptions(DiffusersOptions):
    """Options for writing ai-toolkit files."""

    fold_alpha: bool = option(True, "fold every alpha/rank into the weights (ai-toolkit has no alpha)")


class AiToolkitFormat(DiffusersFormat):
    name = "ai-toolkit"
    label = "ai-toolkit (diffusers names, software metadata)"
    description = (
        "ostris/ai-toolkit's files: `transformer.` / `text_encoder.` + diffusers module path + `lora_A` / "
        "`lora_B`, scales folded into the weights, and a `software` metadata entry naming ai-toolkit."
    )
    metadata_schema = on_demand("loraformats_dialects.schemas:AiToolkitMetadata")
    options_schema = AiToolkitOptions
    owned_metadata: ClassVar[tuple[str, ...]] = (SOFTWARE_KEY,)
    refines: ClassVar[str | None] = "diffusers"
    reads_adapter_metadata: ClassVar[bool] = False

    def sniff(self, header: Header) -> Evidence:
        """diffusers' names confirmed by the `software` entry; without it the file is diffusers' (and
        the names are not sniffed twice)."""
        if not written_by_ai_toolkit(header.metadata):
            return Evidence(
                0.0, against=["no software metadata naming ai-toolkit (diffusers' own files have none)"]
            )
        evidence = DiffusersFormat.sniff(self, header)
        evidence.reasons.append("its software metadata names ai-toolkit")
        return evidence

    def encode(self, adapters: AdapterSet, options: Any) -> Encoded:
        encoded = super().encode(adapters, options or AiToolkitOptions())
        if not written_by_ai_toolkit(encoded.metadata):
            encoded.metadata[SOFTWARE_KEY] = json.dumps(SOFTWARE)
        return encoded
