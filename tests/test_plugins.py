"""Plugins register through the `loraformats` entry-point group, exactly as built-ins do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "sd15_tiny_kohya.safetensors"

PLUGIN = '''
"""A third-party format: Kohya factor names on dotted, component-prefixed module paths."""
from loraformats import Format, hookimpl
from loraformats.adapters import Exactness, LoRA
from loraformats.families import ComponentHint
from loraformats.formats import Encoded, Evidence, ParsedFile, ParsedModule
from loraformats.report import Step

ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


class DottedKohya(Format):
    name = "dotted-kohya"
    label = "Kohya factors on dotted paths"
    capabilities = frozenset({"lora"})

    def _split(self, key):
        for suffix, role in ROLES.items():
            if key.endswith("." + suffix):
                component, _, path = key[: -len(suffix) - 1].partition(".")
                return (component, path, role) if path else None
        return None

    def sniff(self, header):
        ours = sum(1 for k in header.tensors if self._split(k))
        return Evidence(ours / max(len(header.tensors), 1), [f"{ours} dotted lora_down/lora_up keys"])

    def parse(self, header):
        modules = {}
        for key in header.tensors:
            component, path, role = self._split(key)
            module = modules.setdefault((component, path), ParsedModule(
                f"{component}.{path}", ComponentHint(name=component), (path,), flat=False, tensors={}))
            module.tensors[role] = key
        return ParsedFile(list(modules.values()))

    def encode(self, adapters, options):
        tensors = []
        for (component, path), lora in adapters.modules.items():
            stem = f"{component}.{path}"
            tensors += [(f"{stem}.lora_down.weight", lora.down), (f"{stem}.lora_up.weight", lora.up)]
            if lora.alpha is not None:
                tensors.append((f"{stem}.alpha", lora.alpha))
        step = Step(stage="write", name="dotted names", exactness=Exactness.IDENTICAL, modules=len(tensors))
        return Encoded(tensors, dict(adapters.metadata), [step])


@hookimpl
def register_formats(register):
    register(DottedKohya())
'''


@pytest.fixture
def plugin_site(tmp_path):
    """A directory holding an installed distribution with a `loraformats` entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "lf_dotted_kohya.py").write_text(PLUGIN)
    dist = site / "lf_dotted_kohya-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lf-dotted-kohya\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[loraformats]\ndotted-kohya = lf_dotted_kohya\n")
    return site


def run(*args: str, site: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    if site:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "loraformats", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def test_entry_point_plugin_is_listed_and_converts(plugin_site, tmp_path):
    listed = run("formats", "--json", site=plugin_site)
    assert listed.returncode == 0, listed.stderr
    formats = json.loads(listed.stdout)
    assert formats["formats"]["dotted-kohya"]["plugin"] == "dotted-kohya"
    assert formats["plugins"]["dotted-kohya"]["distribution"] == "lf-dotted-kohya"

    dotted = tmp_path / "dotted.safetensors"
    done = run("convert", str(EXAMPLE), "--to", "dotted-kohya", "-o", str(dotted), site=plugin_site)
    assert done.returncode == 0, done.stderr
    back = tmp_path / "back.safetensors"
    done = run("convert", str(dotted), "--to", "kohya", "-o", str(back), site=plugin_site)
    assert done.returncode == 0, done.stderr
    assert run("verify", str(EXAMPLE), str(back), site=plugin_site).returncode == 0
    detected = json.loads(run("detect", str(dotted), "--json", site=plugin_site).stdout)
    assert (detected["format"], detected["family"]) == ("dotted-kohya", "sd1")


def test_blocked_plugin_disappears(plugin_site):
    listed = run("formats", "--json", site=plugin_site, env={"LORAFORMATS_BLOCK_PLUGINS": "dotted-kohya"})
    assert "dotted-kohya" not in json.loads(listed.stdout)["formats"]
    only = run(
        "formats", "--json", site=plugin_site, env={"LORAFORMATS_LOAD_PLUGINS": "kohya,stable_diffusion"}
    )
    assert set(json.loads(only.stdout)["formats"]) == {"kohya"}


def test_builtin_plugins_and_detection_do_not_import_torch():
    code = textwrap.dedent(f"""
        import sys, loraformats_kohya, loraformats_diffusers, loraformats_sd
        import loraformats
        from loraformats.plugins import registry
        registry.formats(); registry.families()
        result = loraformats.detect({str(EXAMPLE)!r})
        assert result.family == "sd1", result
        print("torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_duplicate_format_names_are_refused():
    from loraformats.errors import UsageError
    from loraformats.plugins import Registry

    class Twice:
        from loraformats import hookimpl

        @hookimpl
        def register_formats(self, register):
            from loraformats_kohya import KohyaFormat

            register(KohyaFormat())

    fresh = Registry()
    fresh.register(Twice(), name="twice")
    with pytest.raises(UsageError, match="registered by both"):
        fresh.formats()


EXAMPLE_PLUGIN = Path(__file__).parents[1] / "examples" / "plugins" / "loraformats-comfyui-unet"


@pytest.fixture(scope="module")
def installed_example_plugin(tmp_path_factory):
    """The example plugin package, pip-installed into its own directory (removing it uninstalls)."""
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE_PLUGIN)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return target


def test_example_plugin_package_installs_converts_and_uninstalls(installed_example_plugin, tmp_path):
    from loraformats.plugins import registry
    from loraformats.testing import synthetic_adapters, write

    sample = write(
        registry.formats()["kohya"],
        synthetic_adapters(registry.families()["sdxl"], components=("unet",)),
        tmp_path / "unet.safetensors",
    )
    listed = json.loads(run("formats", "--json", site=installed_example_plugin).stdout)
    assert listed["plugins"]["comfyui-unet"]["distribution"] == "loraformats-comfyui-unet"
    comfy = tmp_path / "comfy.safetensors"
    assert (
        run(
            "convert", str(sample), "--to", "comfyui-unet", "-o", str(comfy), site=installed_example_plugin
        ).returncode
        == 0
    )
    detected = json.loads(run("detect", str(comfy), "--json", site=installed_example_plugin).stdout)
    assert (detected["format"], detected["family"]) == ("comfyui-unet", "sdxl")
    back = tmp_path / "back.safetensors"
    assert (
        run("convert", str(comfy), "--to", "kohya", "-o", str(back), site=installed_example_plugin).returncode
        == 0
    )
    assert run("verify", str(sample), str(back), site=installed_example_plugin).returncode == 0
    assert "comfyui-unet" not in json.loads(run("formats", "--json").stdout)["formats"]  # not installed here


def test_example_plugin_passes_the_conformance_suite(installed_example_plugin):
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE_PLUGIN / "tests")],
        capture_output=True, text=True, timeout=300, cwd=EXAMPLE_PLUGIN,
        env={**os.environ, "PYTHONPATH": str(installed_example_plugin)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:]


def test_hook_register_formats(tmp_path):
    """A format registered through the hook is used by convert and detect like a built-in."""
    from loraformats.hookspecs import hookimpl
    from loraformats.plugins import registry
    from loraformats_kohya.format import KohyaFormat

    class Renamed(KohyaFormat):
        name = "kohya-again"

    class Plugin:
        @hookimpl
        def register_formats(self, register):
            register(Renamed())

    registry.register(Plugin(), name="test-formats")
    try:
        assert "kohya-again" in registry.formats()
        import loraformats

        report = loraformats.convert(
            EXAMPLE, "kohya-again", tmp_path / "again.safetensors", source_format="kohya"
        )
        assert report.target_format == "kohya-again" and report.exactness.value == "identical"
    finally:
        registry.unregister("test-formats")
    assert "kohya-again" not in registry.formats()


def test_hook_register_families():
    """The tiny test families arrive through the hook (conftest.py) beside the built-in ones."""
    from loraformats.plugins import registry

    families = registry.families()
    assert {"sd1", "sd2", "sdxl", "tiny-sd1", "tiny-sdxl"} <= set(families)
    assert families["tiny-sd1"].plugin == "tests.tiny_families"


def test_hook_register_transforms(tmp_path):
    """A transform registered through the hook becomes a graph edge the planner takes."""
    from loraformats.adapters import Exactness
    from loraformats.hookspecs import hookimpl
    from loraformats.plugins import registry
    from loraformats.transforms import MergeTuckerMid

    class Named(MergeTuckerMid):
        name = "merge-tucker-mid-again"
        exactness = Exactness.EXACT  # claims to be better, so the planner prefers it

    class Plugin:
        @hookimpl
        def register_transforms(self, register):
            register(Named())

    from lora_factory import make_kohya

    source = tmp_path / "tucker.safetensors"
    make_kohya(source, "tiny-sd1", tucker=True)
    registry.register(Plugin(), name="test-transforms")
    try:
        import loraformats

        report = loraformats.convert(source, "diffusers", tmp_path / "out.safetensors", family="tiny-sd1")
        assert "merge-tucker-mid-again" in [step.name for step in report.steps]
    finally:
        registry.unregister("test-transforms")
