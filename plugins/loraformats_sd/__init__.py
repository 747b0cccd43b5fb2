"""Stable Diffusion 1.x, 2.x and XL: module tables generated from the real model classes.

The tables are frozen in `specs/families/*.json` (see `scripts/generate_family_specs.py`) and
load only when a family is first used, so registering costs nothing.
"""

from loraformats.families import Family, builtin_spec
from loraformats.hookspecs import hookimpl

FAMILIES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
}

#: How trainers name these bases in metadata: sd-scripts' `ss_base_model_version` (library/model_util.py,
#: sdxl_train_util.py) and SAI ModelSpec's `modelspec.architecture` (sd-scripts library/sai_model_spec.py).
ALIASES = {
    "sd1": ("sd_v1", "sd_v1_v", "stable-diffusion-v1"),
    "sd2": ("sd_v2", "sd_v2_v", "stable-diffusion-v2-512", "stable-diffusion-v2-768-v"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
}


@hookimpl
def register_families(register) -> None:
    for name, label in FAMILIES.items():
        register(Family.from_spec_file(name, label, builtin_spec(name), aliases=ALIASES[name]))
