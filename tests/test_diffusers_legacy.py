"""The diffusers reader also accepts the older spellings diffusers and its training scripts wrote."""

from __future__ import annotations

import re

import pytest
from safetensors.torch import load_file, save_file

import loraformats

EXAMPLE = "examples/sd15_tiny_kohya.safetensors"

PEFT_TO_LEGACY = {
    # attention processors (diffusers < 0.22): unet.<block>.attn1.processor.to_q_lora.down.weight
    "processor": [
        (r"(attn\d)\.to_(q|k|v)\.lora_A\.weight$", r"\1.processor.to_\2_lora.down.weight"),
        (r"(attn\d)\.to_(q|k|v)\.lora_B\.weight$", r"\1.processor.to_\2_lora.up.weight"),
        (r"(attn\d)\.to_out\.0\.lora_A\.weight$", r"\1.processor.to_out_lora.down.weight"),
        (r"(attn\d)\.to_out\.0\.lora_B\.weight$", r"\1.processor.to_out_lora.up.weight"),
        (r"self_attn\.(q|k|v)_proj\.lora_A\.weight$", r"self_attn.to_\1_lora.down.weight"),
        (r"self_attn\.(q|k|v)_proj\.lora_B\.weight$", r"self_attn.to_\1_lora.up.weight"),
        (r"self_attn\.out_proj\.lora_A\.weight$", r"self_attn.to_out_lora.down.weight"),
        (r"self_attn\.out_proj\.lora_B\.weight$", r"self_attn.to_out_lora.up.weight"),
        (r"\.lora_A\.weight$", r".lora.down.weight"),
        (r"\.lora_B\.weight$", r".lora.up.weight"),
    ],
    # "diffusers" naming of the SD training scripts: lora.down / lora_linear_layer.down
    "lora.down": [(r"\.lora_A\.weight$", r".lora.down.weight"), (r"\.lora_B\.weight$", r".lora.up.weight")],
    "lora_linear_layer": [
        (r"\.lora_A\.weight$", r".lora_linear_layer.down.weight"),
        (r"\.lora_B\.weight$", r".lora_linear_layer.up.weight"),
    ],
}


def legacy_name(key: str, rules) -> str:
    for pattern, replacement in rules:
        renamed = re.sub(pattern, replacement, key)
        if renamed != key:
            return renamed
    return key


@pytest.mark.parametrize("spelling", PEFT_TO_LEGACY)
def test_legacy_spellings_read_to_the_same_lora(spelling, tmp_path):
    current = tmp_path / "current.safetensors"
    loraformats.convert(EXAMPLE, "diffusers", current, options={"fold_alpha": True})
    legacy = tmp_path / "legacy.safetensors"
    save_file({legacy_name(k, PEFT_TO_LEGACY[spelling]): v for k, v in load_file(current).items()}, legacy)
    detection = loraformats.detect(legacy)
    assert (detection.format, detection.family) == ("diffusers", "sd1"), detection.reasons
    back = tmp_path / "back.safetensors"
    loraformats.convert(legacy, "kohya", back)
    report = loraformats.verify(EXAMPLE, back)
    assert report.ok and report.modules == 283, report
