"""XLabs (x-flux) Flux LoRAs: attention-processor names, `down` / `up` factors, no alpha (scale 1).

`double_blocks.N.processor.qkv_lora1` is the image stream's fused q/k/v, `qkv_lora2` the text
stream's, `proj_lora1/2` their output projections; `single_blocks.N.processor.qkv_lora` is the
q/k/v part of `linear1` and `proj_lora` is `linear2`. The names resolve through the family's
`xlabs` naming, so they convert to any layout (split, or fused into BFL's `linear1`).
"""

from __future__ import annotations

import re

from loraformats.families import ComponentHint
from loraformats.formats import Evidence, Format, ParsedFile
from loraformats.header import Header

KEY = re.compile(
    r"^(?:diffusion_model\.)?(?P<name>(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora\d?)"
    r"\.(?P<role>down|up)\.weight$"
)
DENOISER = ComponentHint(role="denoiser")


class XLabsFormat(Format):
    name = "xlabs"
    label = "XLabs x-flux (read-only)"
    description = (
        "XLabs' Flux LoRAs: `double_blocks.N.processor.qkv_lora1|qkv_lora2|proj_lora1|proj_lora2` and "
        "`single_blocks.N.processor.qkv_lora|proj_lora` + `.down.weight` / `.up.weight`, no alpha."
    )
    writable = False

    def sniff(self, header: Header) -> Evidence:
        return self.share_of_names(header, KEY.match, "XLabs processor LoRA keys")

    def parse(self, header: Header) -> ParsedFile:
        return ParsedFile.by_stem(header, _split, DENOISER, lambda _: "not an XLabs processor LoRA key")


def _split(tensor: str) -> tuple[str, str] | None:
    found = KEY.match(tensor)
    return (found["name"], found["role"]) if found else None
