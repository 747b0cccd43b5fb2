"""Kohya sd-scripts LoRA/LoCon files: `lora_unet_…` / `lora_te*_…` + `lora_down`/`lora_up`/`alpha`."""

from loraformats.hookspecs import hookimpl

from .format import KohyaFormat


@hookimpl
def register_formats(register) -> None:
    register(KohyaFormat())
