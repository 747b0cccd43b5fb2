"""Plugin schemas and reports without pydantic at start-up: option dataclasses validated by pydantic
on demand, metadata models named with `on_demand`, and reports that dump as pydantic models do."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from loraformats.cli import main
from loraformats.conversion import _options, convert
from loraformats.errors import UsageError
from loraformats.plugins import registry
from loraformats.report import ConversionReport
from loraformats.schemas import schema_fields

EXAMPLE = "examples/sd15_tiny_kohya.safetensors"


def test_options_default_without_values_and_validate_values_leniently():
    formats = registry.formats()
    assert _options(formats["diffusers"], None).fold_alpha is False
    assert _options(formats["ai-toolkit"], {}).fold_alpha is True  # a dialect's own default
    assert _options(formats["diffusers"], {"fold_alpha": "true"}).fold_alpha is True
    assert _options(formats["lycoris"], {"prefix": "lycoris"}).prefix == "lycoris"
    assert _options(formats["comfyui"], None) is not None


def test_unknown_and_invalid_options_are_refused_by_name():
    diffusers = registry.formats()["diffusers"]
    with pytest.raises(UsageError, match=r"diffusers has no option 'bogus' \(options: fold_alpha\)"):
        _options(diffusers, {"bogus": "1"})
    with pytest.raises(UsageError, match="option fold_alpha"):
        _options(diffusers, {"fold_alpha": "maybe"})
    with pytest.raises(UsageError, match="comfyui has no option 'naming'"):
        _options(registry.formats()["comfyui"], {"naming": "ldm"})


def test_every_schema_describes_itself():
    for fmt in registry.formats().values():
        if fmt.options_schema is not None:
            schema = fmt.options_schema.model_json_schema()
            assert schema["type"] == "object" and schema["additionalProperties"] is False, fmt.name
            assert all(field.get("description") for field in schema_fields(fmt.options_schema).values())
        if fmt.metadata_schema is not None:  # named on demand, read here: a pydantic model
            assert issubclass(fmt.metadata_schema, BaseModel), fmt.name
            assert schema_fields(fmt.metadata_schema), fmt.name


def test_the_report_dumps_and_validates_like_a_pydantic_model(tmp_path, capsys):
    report = convert(EXAMPLE, "diffusers", tmp_path / "out.safetensors")
    dumped = json.loads(report.model_dump_json())
    assert dumped["schema_version"] == 1 and dumped["exactness"] == report.exactness.value
    assert dumped["steps"][0].keys() == {"stage", "name", "exactness", "modules", "detail"}
    assert ConversionReport.model_validate(dumped) == report
    assert report.model_dump(mode="json") == dumped
    assert (
        main(["convert", EXAMPLE, "--to", "kohya", "-o", str(tmp_path / "k.safetensors"), "--report", "json"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["target_format"] == "kohya"
