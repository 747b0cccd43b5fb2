"""The entry-point reader against importlib.metadata, the behaviour it stands in for."""

from __future__ import annotations

import sys
import zipfile
from importlib import metadata

import pytest

from loraformats.entrypoints import EntryPoint, entry_points


@pytest.mark.parametrize("group", ["loraformats", "console_scripts", "pytest11"])
def test_same_entry_points_as_importlib_metadata_here(group):
    expected = [(e.name, e.value, e.dist.name, e.dist.version) for e in metadata.entry_points(group=group)]
    found = [(e.name, e.value, e.distribution, e.version) for e in entry_points(group)]
    assert sorted(found) == sorted(expected)
    assert found


def _install(root, directory, text):
    (root / directory).mkdir(parents=True)
    if text is not None:
        (root / directory / "entry_points.txt").write_text(text)
    stem = directory.rpartition(".")[0]
    if "-" in stem:  # core metadata headers, then a body that must not be read as headers
        name, version = stem.split("-")[:2]
        headers = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nName: body\n"
        kind = "METADATA" if directory.endswith(".dist-info") else "PKG-INFO"
        (root / directory / kind).write_text(headers)


def test_precedence_formats_and_sections_match_importlib_metadata(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    _install(first, "Shadowed.Plugin-2.0.dist-info", "[loraformats]\nwinner = first_mod\n")
    _install(second, "shadowed_plugin-1.0.dist-info", "[loraformats]\nloser = second_mod\n")
    _install(
        first,
        "other-0.3.dist-info",
        "# a comment\n[console_scripts]\nother = other.cli:main\n\n[loraformats]\n"
        "  spaced =  pkg.sub : thing.attr  [extra]\n",
    )
    _install(first, "legacy-1.1-py3.11.egg-info", "[loraformats]\nlegacy = legacy_mod\n")
    _install(first, "noversion.egg-info", "[loraformats]\nbare = bare_mod\n")
    _install(first, "nothing-1.0.dist-info", None)  # no entry_points.txt at all
    archive = tmp_path / "packed.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        packed.writestr("x.py", "")
    path = [str(first), str(archive), str(tmp_path / "missing"), str(second)]

    monkeypatch.setattr(sys, "path", path)
    expected = sorted(
        (e.name, e.value, e.dist.name, e.dist.version) for e in metadata.entry_points(group="loraformats")
    )
    found = entry_points("loraformats", path)
    assert sorted((e.name, e.value, e.distribution, e.version) for e in found) == expected
    assert {e.name: (e.distribution, e.version) for e in found} == {
        "winner": ("Shadowed.Plugin", "2.0"),
        "spaced": ("other", "0.3"),
        "legacy": ("legacy", "1.1"),
        "bare": (None, None),
    }


def test_load_follows_the_attribute_path(tmp_path, monkeypatch):
    (tmp_path / "ep_probe_module.py").write_text("class Outer:\n    class Inner:\n        value = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert EntryPoint("probe", "ep_probe_module:Outer.Inner [extra]", None, None).load().value == 42
    assert EntryPoint("probe", "ep_probe_module", None, None).load() is sys.modules["ep_probe_module"]
