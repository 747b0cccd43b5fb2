"""Issue acceptance 2: Kohya files converted to diffusers make the same changes in a real diffusers pipeline.

Each test writes a Kohya LoRA/LoCon (random N(0, 1) factors, Tucker cores, varied alphas) for a tiny
family, converts it with `loraformats.convert(..., to="diffusers")`, loads the result into a fresh tiny
pipeline with `load_lora_weights`, fuses it, and compares W' - W of every module (float64, read off the
fp32 model) with an independent float64 reference computed from the Kohya source.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import loraformats
from lora_factory import (
    adapter_metadata,
    changed,
    count_lora_layers,
    file_metadata,
    make_kohya,
    module_changes,
    per_component,
    reference_deltas,
    relative_errors,
    snapshot,
    worst,
)
from loraformats.cli import main
from tiny import build_pipeline, tiny_family

FP32_LIMIT = 1e-6  # per-module relative error (Frobenius) in an fp32 pipeline

#: (family, Kohya UNet naming): SDXL in both the SGM naming sd-scripts writes and the diffusers one.
FAMILIES = [
    pytest.param("tiny-sd1", "canonical", id="sd1"),
    pytest.param("tiny-sd2", "canonical", id="sd2"),
    pytest.param("tiny-sdxl", "ldm", id="sdxl-ldm"),
    pytest.param("tiny-sdxl", "canonical", id="sdxl-canonical"),
]
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # the tiny pipelines' scheduler config


@pytest.fixture(autouse=True)
def quiet_lora_loading():
    """transformers prints a load report per text encoder and a progress bar; neither is news here."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def apply_in_diffusers(family_name: str, lora, adapter: str = "lora"):
    """Load and fuse `lora` in a fresh tiny pipeline: (W' - W per module, LoRA layers per model)."""
    family = tiny_family(family_name)
    pipe = build_pipeline(family_name)
    before = snapshot(pipe, family)
    pipe.load_lora_weights(str(lora), adapter_name=adapter)
    counts = count_lora_layers(pipe, adapter)
    pipe.fuse_lora(components=list(family.components), lora_scale=1.0)
    return module_changes(before, pipe), counts


def expected_counts(family_name: str, keys) -> dict[str, int]:
    return {name: 0 for name in tiny_family(family_name).components} | per_component(keys)


def assert_same_changes(expected, changes, limit: float = FP32_LIMIT) -> None:
    assert changed(changes) == set(expected), "the modules changed are not exactly the source's modules"
    assert not worst(relative_errors(expected, changes), limit)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("family_name", "naming"), FAMILIES)
def test_converted_kohya_changes_every_module_as_the_source_in_diffusers(
    tmp_path, family_name, naming, dtype
):
    """Mixed alphas (scale 1, powers of two, others, absent) and Tucker cores, end to end in diffusers."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    make_kohya(source, family_name, naming=naming, dtype=dtype, seed=1)
    report = loraformats.convert(source, "diffusers", output, family=family_name)
    expected = reference_deltas(source, family_name)

    changes, counts = apply_in_diffusers(family_name, output)

    assert counts == expected_counts(family_name, expected)
    assert_same_changes(expected, changes)
    assert report.modules == len(expected)


@pytest.mark.parametrize(("family_name", "naming"), [FAMILIES[0], FAMILIES[2]])
def test_folded_alphas_need_no_adapter_metadata(tmp_path, capsys, family_name, naming):
    """CLI `--set fold_alpha=true`: every scale is in the float32 factors; diffusers needs no metadata."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    make_kohya(source, family_name, naming=naming, dtype=torch.float16, seed=2)
    arguments = ["convert", str(source), "--to", "diffusers", "-o", str(output), "--family", family_name]
    assert main([*arguments, "--set", "fold_alpha=true", "--report", "json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert "lora_adapter_metadata" not in file_metadata(output)
    assert any(step["exactness"] == "rounded" and "fold" in step["name"] for step in report["steps"])
    changes, counts = apply_in_diffusers(family_name, output)
    expected = reference_deltas(source, family_name)
    assert counts == expected_counts(family_name, expected)
    assert_same_changes(expected, changes)


@pytest.mark.parametrize(("family_name", "naming"), [FAMILIES[1], FAMILIES[2]])
def test_adapter_metadata_patterns_give_every_module_its_scale_in_diffusers(tmp_path, family_name, naming):
    """Non-power-of-two alphas at ranks 4/2/8: the scale travels in `lora_adapter_metadata` (rank_pattern,
    alpha_pattern, target_modules per component, text encoders included) and diffusers honours it."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    make_kohya(source, family_name, naming=naming, rank=(4, 2, 8), alpha="nonpow2", seed=3)
    report = loraformats.convert(source, "diffusers", output, family=family_name)

    assert any("lora_adapter_metadata" in warning for warning in report.warnings)
    config = adapter_metadata(output)
    for component in tiny_family(family_name).components:
        assert config[f"{component}.rank_pattern"] and config[f"{component}.alpha_pattern"], component
        assert config[f"{component}.target_modules"], component
    changes, counts = apply_in_diffusers(family_name, output)
    expected = reference_deltas(source, family_name)
    assert counts == expected_counts(family_name, expected)
    assert_same_changes(expected, changes)


@pytest.mark.parametrize(
    "alpha", [pytest.param(3.0, id="alpha3-rank4"), pytest.param("rank", id="alpha=rank")]
)
@pytest.mark.parametrize(("family_name", "naming"), FAMILIES)
def test_diffusers_own_kohya_loader_agrees_with_the_converted_file(tmp_path, family_name, naming, alpha):
    """diffusers' Kohya loader on the original file changes every module as ours does on the converted one.

    Without Tucker cores (diffusers refuses `lora_mid`) and with one alpha for every module: diffusers
    0.42.1's Kohya loader drops per-module alphas of attention and text-encoder modules (its alpha
    names do not match its module names), so varied alphas are checked against the reference only.
    """
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    make_kohya(source, family_name, naming=naming, tucker=False, alpha=alpha, seed=4)
    loraformats.convert(source, "diffusers", output, family=family_name)

    theirs, their_counts = apply_in_diffusers(family_name, source, adapter="kohya")
    ours, our_counts = apply_in_diffusers(family_name, output)

    expected = reference_deltas(source, family_name)
    assert our_counts == their_counts == expected_counts(family_name, expected)
    assert changed(theirs) == changed(ours) == set(expected)
    assert not worst(relative_errors({key: theirs[key] for key in expected}, ours), FP32_LIMIT)
    assert not worst(relative_errors(expected, theirs), FP32_LIMIT)


def test_tucker_kohya_file_loads_in_diffusers_only_after_conversion(tmp_path):
    """diffusers refuses `lora_mid` (Tucker) keys; the converted file carries the same changes and loads."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    make_kohya(source, "tiny-sd1", seed=5)
    report = loraformats.convert(source, "diffusers", output, family="tiny-sd1")

    with pytest.raises(ValueError, match="lora_mid"):
        build_pipeline("tiny-sd1").load_lora_weights(str(source))
    assert any(step.exactness == "rounded" and "tucker" in step.name for step in report.steps)
    changes, _ = apply_in_diffusers("tiny-sd1", output)
    assert_same_changes(reference_deltas(source, "tiny-sd1"), changes)
