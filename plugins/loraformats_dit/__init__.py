"""Diffusion transformers: FLUX.1 and SD3 / 3.5, with their original (BFL, MMDiT) namings and
fused groups. Tables generated from the real model classes, frozen in `specs/families/`."""

from loraformats.families import Family, builtin_spec
from loraformats.hookspecs import hookimpl

FAMILIES = {
    "flux1": "FLUX.1 (dev, schnell, Kontext)",
    "chroma": "Chroma",
    "flux2": "FLUX.2 (dev)",
    "sd3": "Stable Diffusion 3 Medium",
    "sd3.5-medium": "Stable Diffusion 3.5 Medium",
    "sd3.5-large": "Stable Diffusion 3.5 Large",
}

#: How trainers name these bases in metadata: sd-scripts' `ss_base_model_version` and ModelSpec's
#: `modelspec.architecture` (library/sai_model_spec.py; musubi spells Flux `Flux.1-dev`).
ALIASES = {
    "flux1": (
        "flux1",
        "flux-1",
        "flux-1-dev",
        "flux-1-schnell",
        "flux.1-dev",
        "flux.1-schnell",
        "flux_kontext",
    ),
    "chroma": ("chroma",),
    "flux2": ("flux.2-dev", "flux_2_dev", "flux-2-dev"),
    "sd3": ("sd3", "medium", "stable-diffusion-3-medium"),
    "sd3.5-medium": ("5-medium", "stable-diffusion-3-5-medium", "stable-diffusion-3.5-medium"),
    "sd3.5-large": ("5-large", "stable-diffusion-3-5-large", "stable-diffusion-3.5-large"),
}


_GUIDANCE = tuple(f"transformer:time_text_embed.guidance_embedder.linear_{i}" for i in (1, 2))
#: Releases that share a table, and the modules each lacks (schnell is guidance-distilled away).
RELEASES = {"flux1": {"dev": (), "schnell": _GUIDANCE, "kontext": ()}}


@hookimpl
def register_families(register) -> None:
    for name, label in FAMILIES.items():
        spec = builtin_spec(name)
        register(Family.from_spec_file(name, label, spec, aliases=ALIASES[name], releases=RELEASES.get(name)))
