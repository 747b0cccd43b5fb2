"""The ComfyUI format: original checkpoint names under `diffusion_model.`, encoders under
`text_encoders.<encoder>.transformer.`."""

from loraformats.hookspecs import hookimpl

from .format import ComfyUIFormat


@hookimpl
def register_formats(register) -> None:
    register(ComfyUIFormat())
