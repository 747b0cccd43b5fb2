"""PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, one per component."""

from loraformats.hookspecs import hookimpl

from .format import PeftFormat


@hookimpl
def register_formats(register) -> None:
    register(PeftFormat())
