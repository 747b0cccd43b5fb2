"""`inspect` reports modules by block, metadata and sizes from the header alone, in 80 columns or JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest

from headers.corpus import Layout, build, write
from loraformats.cli import main
from loraformats.inspection import inspect, render

ROOT = Path(__file__).resolve().parents[1]
WIDE = [
    Layout("sdxl", "kohya", metadata="contradicting", ranks="mixed"),
    Layout("sd1", "kohya", selection="attn1", metadata="sd-scripts"),
    Layout("sd2", "diffusers", spelling="attn_procs", dtype="BF16"),
    Layout("sdxl", "diffusers", algorithm="dora", selection="attention", metadata="diffusers-config"),
    Layout("sd1", "kohya", algorithm="tucker"),
]


def no_data_reads():
    def refuse(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    return mock.patch.object(os, "pread", refuse)


@pytest.mark.parametrize("layout", WIDE, ids=[layout.id for layout in WIDE])
def test_text_report_fits_80_columns(layout, tmp_path):
    path = write(build(layout), tmp_path / "lora.safetensors")
    with no_data_reads():
        text = render(inspect(path))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert text.splitlines()[0] == str(path)


def test_text_report_groups_modules_by_block_and_shows_metadata(tmp_path):
    path = write(build(Layout("sdxl", "kohya", metadata="sd-scripts")), tmp_path / "lora.safetensors")
    text = render(inspect(path))
    assert "  family     sdxl (Stable Diffusion XL); confidence 1.00" in text
    assert "  naming     unet: ldm" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("    ")}
    assert rows["text_model.encoder.layers.0-31"][1] == "192"  # 32 identical layers, folded
    assert rows["down_blocks.2"][2:5] == ["4", "-", "F16"]
    assert "  trigger_words           mychar, 1girl, solo, smile, outdoors" in text
    assert "  ss_learning_rate        0.0001" in text
    assert "alpha: tensor data, not read" in text


def test_alphas_are_shown_when_asked(tmp_path):
    path = write(build(Layout("sd1", "kohya", selection="te")), tmp_path / "lora.safetensors")
    text = render(inspect(path, read_alphas=True))
    row = next(line for line in text.splitlines() if "text_model.encoder.layers" in line)
    assert row.split()[1:4] == ["72", "4", "4"]  # the zero-filled alphas mean alpha = rank
    assert "not read" not in text


def test_sizes_come_from_the_header(tmp_path):
    fixture = build(Layout("sd2", "kohya", selection="unet_attention", dtype="F32"))
    path = write(fixture, tmp_path / "lora.safetensors")
    with no_data_reads():
        size = inspect(path).size
    assert size.file_bytes == path.stat().st_size
    assert size.data_bytes == size.dtypes["F32"] == path.stat().st_size - size.header_bytes
    assert size.parameters == size.data_bytes // 4


def test_contradictions_and_ambiguity_are_in_the_text(tmp_path):
    contradicted = write(build(Layout("sdxl", "kohya", metadata="contradicting")), tmp_path / "a.safetensors")
    assert "contradictions (the tensors win):" in render(inspect(contradicted))
    tied = write(build(Layout("sd1", "kohya", selection="attn1")), tmp_path / "b.safetensors")
    text = render(inspect(tied))
    assert "  family     ambiguous: sd1, sd2; confidence 0.50" in text
    assert "modules that would tell them apart are absent" in " ".join(text.split())


def test_inspect_json_validates_against_the_published_schema(tmp_path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "specs" / "inspection.schema.json").read_text())
    layout = Layout("sd1", "diffusers", metadata="diffusers-config")
    path = write(build(layout), tmp_path / "lora.safetensors")
    assert main(["inspect", "--json", str(path)]) == 0
    output = json.loads(capsys.readouterr().out)
    jsonschema.validate(output, schema)
    assert output["detection"]["family"] == "sd1" and output["size"]["file_bytes"] == path.stat().st_size


def test_cli_text_is_the_rendered_report(tmp_path, capsys):
    path = write(build(Layout("sd1", "kohya", selection="te")), tmp_path / "lora.safetensors")
    assert main(["inspect", str(path)]) == 0
    assert capsys.readouterr().out.rstrip("\n") == render(inspect(path))
