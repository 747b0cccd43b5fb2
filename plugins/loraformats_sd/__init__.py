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


@hookimpl
def register_families(register) -> None:
    for name, label in FAMILIES.items():
        register(Family.from_spec_file(name, label, builtin_spec(name)))
