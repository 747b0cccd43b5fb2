"""The diffusers single-file LoRA: `unet.` / `text_encoder.` + module path + `lora_A` / `lora_B`."""

from loraformats.hookspecs import hookimpl

from .format import DiffusersFormat


@hookimpl
def register_formats(register) -> None:
    register(DiffusersFormat())
