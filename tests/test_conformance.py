"""Every installed format and family passes the conformance suite of `loraformats.testing`."""

from __future__ import annotations

import pytest

from loraformats.plugins import registry
from loraformats.testing import FamilyConformance, FormatConformance

pytest_plugins = ["pytester"]


class TestKohya(FormatConformance):
    format_name = "kohya"


class TestDiffusers(FormatConformance):
    format_name = "diffusers"


class TestPeft(FormatConformance):
    format_name = "peft"


class TestLycoris(FormatConformance):
    format_name = "lycoris"


class TestComfyUI(FormatConformance):
    format_name = "comfyui"


class TestAiToolkit(FormatConformance):
    format_name = "ai-toolkit"


class TestXLabs(FormatConformance):
    format_name = "xlabs"


class TestOneTrainer(FormatConformance):
    format_name = "onetrainer"


class TestFalKontext(FormatConformance):
    format_name = "fal-kontext"


class TestBflControl(FormatConformance):
    format_name = "bfl-control"


@pytest.mark.parametrize(
    "name", ["sd1", "sd2", "sdxl", "flux1", "flux2", "chroma", "sd3", "sd3.5-medium", "sd3.5-large"]
)
class TestFamilies(FamilyConformance):
    @pytest.fixture
    def family(self, name):
        return registry.families()[name]


def test_every_installed_writable_format_has_a_conformance_class():
    tested = {cls.format_name for cls in FormatConformance.__subclasses__()}
    assert set(registry.formats()) <= tested | {"dotted-kohya"}


BROKEN = '''
from loraformats import hookimpl
from loraformats.plugins import registry
from loraformats.testing import FormatConformance
from loraformats_kohya.format import KohyaFormat


class DropsATensor(KohyaFormat):
    """Writes Kohya files but silently drops every mid factor and one up factor."""

    name = "drops-a-tensor"

    def encode(self, adapters, options):
        encoded = super().encode(adapters, options)
        encoded.tensors = [t for t in encoded.tensors if ".lora_mid." not in t[0]][:-1]
        return encoded


class Plugin:
    @hookimpl
    def register_formats(self, register):
        register(DropsATensor())


registry.register(Plugin(), name="broken")


class TestBroken(FormatConformance):
    format_name = "drops-a-tensor"
'''


def test_a_plugin_that_drops_tensors_fails_the_suite(pytester):
    pytester.makepyfile(test_broken=BROKEN)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 2, result.stdout.str()
    registry.unregister("broken")
