"""The whole loraformats conformance suite, for this plugin, in one class."""

from loraformats.testing import FormatConformance


class TestComfyUIUNet(FormatConformance):
    format_name = "comfyui-unet"
    components = ("unet",)  # a UNet-only format
