"""A third-party loraformats plugin: ComfyUI's own LoRA files for UNet models.

ComfyUI names a LoRA module after the weight it patches in the original (LDM/SGM) checkpoint:
`diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_down.weight`, plus
`lora_up.weight` and an optional `alpha` (scale = alpha / rank, as in Kohya files).

It needs nothing but the public plugin API: a family's "ldm" naming gives the names, the core
resolves them, and `Format` does the rest. loraformats now ships a full `comfyui` format; this one
declares itself a dialect of it (`refines`), so where both explain a file, the plugin's answer wins.
"""

from __future__ import annotations

from loraformats import Format, hookimpl
from loraformats.adapters import Exactness, LoRA
from loraformats.errors import UnsupportedError
from loraformats.families import ComponentHint
from loraformats.formats import Encoded, Evidence, ParsedFile, ParsedModule
from loraformats.report import Step

PREFIX = "diffusion_model."
ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
NAMING = "ldm"


def split(key: str) -> tuple[str, str] | None:
    """(module path, role) of one of our keys, or None."""
    if not key.startswith(PREFIX):
        return None
    for suffix, role in ROLES.items():
        if key.endswith("." + suffix):
            return key[len(PREFIX) : -len(suffix) - 1], role
    return None


class ComfyUIUNet(Format):
    name = "comfyui-unet"
    refines = "comfyui"  # a narrower reading of the built-in comfyui format
    label = "ComfyUI LoRA save (UNet, LDM names)"
    description = "`diffusion_model.<LDM module path>.lora_down.weight` / `lora_up.weight` / `alpha`."
    capabilities = frozenset({"lora"})

    def sniff(self, header):
        ours = sum(1 for key in header.tensors if split(key))
        total = len(header.tensors) or 1
        return Evidence(ours / total, [f"{ours} of {total} keys are diffusion_model.<path>.lora_*"])

    def parse(self, header):
        modules: dict[str, ParsedModule] = {}
        unsupported = {}
        for key in header.tensors:
            found = split(key)
            if found is None:
                unsupported[key] = "not a ComfyUI UNet LoRA key"
                continue
            path, role = found
            module = modules.setdefault(
                path,
                ParsedModule(PREFIX + path, ComponentHint(role="denoiser"), (path,), flat=False, tensors={}),
            )
            module.tensors[role] = key
        return ParsedFile(list(modules.values()), unsupported)

    def encode(self, adapters, options):
        tensors = []
        for (component_name, path), adapter in adapters.modules.items():
            component = adapters.component(component_name)
            if component.role != "denoiser" or NAMING not in component.namings:
                raise UnsupportedError(
                    f"{self.name} holds UNet modules with LDM names only ({component_name}:{path})"
                )
            if not isinstance(adapter, LoRA) or adapter.mid is not None:
                raise UnsupportedError(f"{self.name} cannot hold {sorted(adapter.features())} ({path})")
            stem = PREFIX + component.name_in(path, NAMING)
            tensors += [(f"{stem}.lora_down.weight", adapter.down), (f"{stem}.lora_up.weight", adapter.up)]
            if adapter.alpha is not None:
                tensors.append((f"{stem}.alpha", adapter.alpha))
        step = Step(
            stage="write",
            name="ComfyUI UNet names",
            exactness=Exactness.IDENTICAL,
            modules=len(adapters.modules),
            detail="diffusion_model. + LDM module path",
        )
        return Encoded(tensors, dict(adapters.metadata), [step])


@hookimpl
def register_formats(register) -> None:
    register(ComfyUIUNet())
