"""Shared fixtures: tiny families registered through the public hook, quiet third-party logs."""

from __future__ import annotations

import logging
import warnings

import pytest

from loraformats.hookspecs import hookimpl
from loraformats.plugins import registry
from tiny import TINY, tiny_dit_family, tiny_family


class TinyFamilies:
    """A test plugin: registers the tiny SD variants exactly as a family plugin would."""

    @hookimpl
    def register_families(self, register) -> None:
        for name in TINY:
            register(tiny_family(name))
        for name in ("tiny-flux", "tiny-sd3"):
            register(tiny_dit_family(name))


@pytest.fixture(autouse=True, scope="session")
def tiny_families():
    registry.register(TinyFamilies(), name="tests.tiny_families")
    yield
    registry.unregister("tests.tiny_families")


@pytest.fixture(autouse=True, scope="session")
def quiet_libraries():
    for name in ("diffusers", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
