"""Original (BFL) module names with PEFT factors: fal's Kontext LoRAs and BFL's control LoRAs.

Both name Flux modules the way BFL's checkpoints do (`double_blocks.N.img_attn.qkv`) with
`lora_A` / `lora_B` and no alpha (scale 1). fal prefixes them with `base_model.model.`. BFL's
control LoRAs (Canny, Depth) also replace the qk-norm scales and add bias deltas; those parts are
not deltas of a LoRA and are refused by name, with the reason.
"""

from __future__ import annotations

import re

from loraformats.families import ComponentHint
from loraformats.formats import Evidence, Format, ParsedFile
from loraformats.header import Header

ROLES = {"lora_A.weight": "down", "lora_B.weight": "up"}
NOT_DELTAS = {
    ".scale": "norm scales that replace the base model's (not a LoRA delta)",
    ".lora_B.bias": "bias deltas (lora_B.bias), which no LoRA format here can carry",
    ".lora_A.bias": "bias terms on lora_A, which no LoRA format here can carry",
}
DENOISER = ComponentHint(role="denoiser")
BFL_NAME = re.compile(
    r"^(double_blocks|single_blocks|final_layer|img_in|txt_in|time_in|vector_in|guidance_in)\b"
)


class OriginalNamesFormat(Format):
    """BFL names after `prefix`, PEFT factor suffixes."""

    prefix = ""
    writable = False

    def _split(self, tensor: str) -> tuple[str, str] | None:
        if not tensor.startswith(self.prefix):
            return None
        rest = tensor[len(self.prefix) :]
        stem, _, role = rest.partition(".lora_")
        role = ROLES.get(f"lora_{role}")
        if role is None or not BFL_NAME.match(stem):
            return None
        return stem, role

    def _not_delta(self, tensor: str) -> str | None:
        rest = tensor[len(self.prefix) :] if tensor.startswith(self.prefix) else None
        if rest is None or not BFL_NAME.match(rest):
            return None
        return next((why for suffix, why in NOT_DELTAS.items() if rest.endswith(suffix)), None)

    def sniff(self, header: Header) -> Evidence:
        shown = f"{self.prefix} + " if self.prefix else ""
        return self.share_of_names(header, self._knows, f"{shown}BFL module names + lora_A/lora_B")

    def _knows(self, tensor: str) -> bool:
        """A factor of this format, or a part of it that is refused by name (not a delta)."""
        return self._split(tensor) is not None or self._not_delta(tensor) is not None

    def parse(self, header: Header) -> ParsedFile:
        return ParsedFile.by_stem(
            header, self._split, DENOISER, lambda t: self._not_delta(t) or f"not a {self.name} LoRA key"
        )


class FalKontextFormat(OriginalNamesFormat):
    name = "fal-kontext"
    label = "fal FLUX.1 Kontext LoRA (read-only)"
    description = (
        "fal's Kontext trainer: `base_model.model.` + BFL module names + `lora_A` / `lora_B`, no alpha."
    )
    prefix = "base_model.model."
    refines = "peft"  # PEFT's key grammar, with BFL's module names


class BflControlFormat(OriginalNamesFormat):
    name = "bfl-control"
    label = "BFL names + PEFT factors, e.g. FLUX.1 control LoRAs (read-only)"
    description = (
        "BFL module names + `lora_A` / `lora_B`, no alpha, as in BFL's Canny/Depth control LoRAs. Their "
        "qk-norm scales and bias deltas are not LoRA deltas: such files are refused, naming those parts."
    )

    refines = "diffusers"  # PEFT factor suffixes, as in diffusers' files, on BFL's module names

    def sniff(self, header: Header) -> Evidence:
        evidence = super().sniff(header)
        if any(name.endswith("norm.scale") for name in header.tensors):
            evidence.reasons.append("it replaces qk-norm scales, as BFL's control LoRAs do")
        return evidence
