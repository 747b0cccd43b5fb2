"""LyCORIS files: Kohya-style names (`lora_unet_`, `lora_te*_`, standalone `lycoris_`) with every LyCORIS
algorithm's suffixes (LoCon, LoHa, LoKr, (IA)3, full, norm, GLoRA, Diag-OFT, BOFT, DoRA)."""

from loraformats.hookspecs import hookimpl

from .format import LycorisFormat


@hookimpl
def register_formats(register) -> None:
    register(LycorisFormat())
