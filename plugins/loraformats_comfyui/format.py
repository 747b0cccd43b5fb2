"""ComfyUI's own LoRA layout: every module under the name of the model's original checkpoint.

The denoiser's modules are `diffusion_model.` + the original (LDM, BFL, MMDiT) module name, so a
Flux LoRA names the fused `img_attn.qkv` and `linear1`; text encoders are
`text_encoders.<encoder>.transformer.` + the checkpoint path (`clip_l`, `clip_g`, `t5xxl`), as
ComfyUI's `model_lora_keys_unet` / `model_lora_keys_clip` map them. Factors are Kohya's
(`lora_down` / `lora_up` / `lora_mid` / `alpha` / `dora_scale`); `lora_A` / `lora_B` are read too.
"""

from __future__ import annotations

import functools
import re
from typing import Any, ClassVar

from loraformats.canonical import AdapterSet
from loraformats.errors import UnsupportedError
from loraformats.families import CANONICAL, Component, ComponentHint, Family
from loraformats.formats import Evidence, ParsedFile, ParsedModule
from loraformats.header import Header
from loraformats.schemas import Options
from loraformats_kohya.format import KohyaFormat

DENOISER = "diffusion_model."
ENCODERS = re.compile(r"^text_encoders\.(?P<encoder>[a-z0-9_]+)\.(?:transformer\.)?")

#: Tensor suffix -> role, longest first so `.lora_down.weight` is not taken for `.weight`.
SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".dora_scale", "magnitude"),
    (".alpha", "alpha"),
)


class ComfyUIOptions(Options):
    """ComfyUI files take no options: names follow the model's original checkpoint."""


class ComfyUIFormat(KohyaFormat):
    name = "comfyui"
    label = "ComfyUI (original checkpoint names)"
    description = (
        "Single safetensors file with `diffusion_model.` + the original checkpoint's module name (LDM, "
        "BFL fused qkv/linear1, MMDiT) and `text_encoders.<clip_l|clip_g|t5xxl>.transformer.` + the encoder "
        "path; `lora_down` / `lora_up` (or `lora_A` / `lora_B`) + `alpha`."
    )
    # ComfyUI reads dora_scale on either axis, telling them apart by shape as LyCORIS writes them
    capabilities = frozenset({"lora", "lora.tucker", "dora", "dora.output", "dora.input"})
    options_schema = ComfyUIOptions
    owned_metadata: ClassVar[tuple[str, ...]] = ()
    base_model_keys: ClassVar[tuple[str, ...]] = ()

    def sniff(self, header: Header) -> Evidence:
        return self.share_of_names(header, _split, "diffusion_model. / text_encoders. + a factor")

    def describe(self, header: Header) -> dict[str, str]:
        return {}

    def parse(self, header: Header) -> ParsedFile:
        grouped: dict[str, ParsedModule] = {}
        unsupported: dict[str, str] = {}
        for tensor in header.tensors:
            found = _split(tensor)
            if found is None:
                unsupported[tensor] = "not a ComfyUI LoRA key (diffusion_model. or text_encoders. + factor)"
                continue
            stem, hint, name, role = found
            module = grouped.get(stem)
            if module is None:
                module = grouped[stem] = ParsedModule(stem, hint, (name,), flat=False, tensors={})
            if role in module.tensors:
                unsupported[tensor] = f"a second {role} factor for {stem} (lora_A and lora_down?)"
                continue
            module.tensors[role] = tensor
            if role == "magnitude":
                module.algorithm = "dora"
        return ParsedFile(list(grouped.values()), unsupported)

    def naming(self, adapters: AdapterSet, component: Component, options: Any) -> str:
        """The model's original checkpoint naming (text encoders: their checkpoint paths)."""
        return component.native_naming if component.role == "denoiser" else CANONICAL

    def module_stem(self, family: Family, component: Component, path: str, naming: str) -> str:
        name = component.name_in(path, naming)
        if component.role == "denoiser":
            return DENOISER + name
        if component.encoder is None:
            raise UnsupportedError(f"{family.name} does not say which encoder {component.name} is")
        return f"text_encoders.{component.encoder}.transformer.{name}"


def _split(tensor: str) -> tuple[str, ComponentHint, str, str] | None:
    """(module stem, component hint, module name, role) of a ComfyUI key, or None."""
    found_role = next(((suffix, role) for suffix, role in SUFFIXES if tensor.endswith(suffix)), None)
    if found_role is None:
        return None
    suffix, role = found_role
    stem = tensor[: -len(suffix)]
    if stem.startswith(DENOISER):
        return stem, DENOISER_HINT, stem[len(DENOISER) :], role
    found = ENCODERS.match(stem)
    if found is None:
        return None
    return stem, _encoder_hint(found["encoder"]), stem[found.end() :], role


DENOISER_HINT = ComponentHint(role="denoiser")


@functools.cache
def _encoder_hint(encoder: str) -> ComponentHint:
    """One hint per encoder (not one per key)."""
    return ComponentHint(role="text_encoder", encoder=encoder)
