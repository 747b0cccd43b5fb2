"""OneTrainer's DiT LoRAs: Kohya's factors on flattened diffusers names under `lora_transformer_`.

Text encoders keep Kohya's `lora_te1_` / `lora_te2_`; for Flux, OneTrainer numbers T5 `te2` where
sd-scripts says `te3`, which the family's slot numbers resolve. The flattened diffusers naming is
OneTrainer's convention, not something to carry over: writers use their own default naming.
"""

from __future__ import annotations

import re
from typing import ClassVar

from loraformats.canonical import AdapterSet
from loraformats.formats import Evidence, ReadContext
from loraformats.header import Header
from loraformats_kohya.format import KohyaFormat, key_grammar, stem_grammar

KEY = key_grammar("lora_transformer")
STEM = stem_grammar("lora_transformer")


class OneTrainerFormat(KohyaFormat):
    name = "onetrainer"
    label = "OneTrainer DiT LoRA (read-only)"
    description = (
        "OneTrainer's Flux/SD3 files: `lora_transformer_` + flattened diffusers module path, "
        "`lora_te1_`/`lora_te2_` text encoders, `lora_down` / `lora_up` / `alpha` (+ `dora_scale`)."
    )
    writable = False
    key_pattern: ClassVar[re.Pattern[str]] = KEY
    stem_pattern: ClassVar[re.Pattern[str]] = STEM
    owned_metadata: ClassVar[tuple[str, ...]] = ()
    refines: ClassVar[str | None] = "kohya"

    def sniff(self, header: Header) -> Evidence:
        evidence = super().sniff(header)
        if not any(name.startswith("lora_transformer_") for name in header.tensors):
            evidence.score = min(evidence.score, 0.99)
            evidence.against.append("no lora_transformer_ names (Kohya's own files use lora_unet_)")
        return evidence

    def finish_read(self, adapters: AdapterSet, header: Header, context: ReadContext) -> None:
        adapters.provenance.namings.clear()
