"""Trainer dialects of the DiT era: ai-toolkit (read and write); XLabs, OneTrainer, fal Kontext and
BFL control LoRAs (read-only). Each is a small variation of a core format's key grammar."""

from loraformats.hookspecs import hookimpl

from .aitoolkit import AiToolkitFormat
from .onetrainer import OneTrainerFormat
from .original import BflControlFormat, FalKontextFormat
from .xlabs import XLabsFormat


@hookimpl
def register_formats(register) -> None:
    for fmt in (AiToolkitFormat(), XLabsFormat(), OneTrainerFormat(), FalKontextFormat(), BflControlFormat()):
        register(fmt)
