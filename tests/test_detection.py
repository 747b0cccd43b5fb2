"""Detection names format and family from the header alone, and says `ambiguous` when it cannot tell."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from safetensors.torch import save_file

import loraformats
from loraformats.cli import main
from loraformats.plugins import registry


def kohya_from_table(path, family: str, keep, *, naming: str | None = None) -> int:
    """A rank-1 Kohya file over the production table's modules for which keep(component, path) holds."""
    table = registry.families()[family]
    tensors = {}
    for component, module, layer in table.iter_modules():
        if layer.kind not in ("linear", "conv2d") or not keep(component.name, module):
            continue
        prefix = (
            "lora_unet"
            if component.role == "denoiser"
            else ("lora_te" if len(table.text_encoders()) == 1 else f"lora_te{component.slot}")
        )
        chosen = naming if naming and component.role == "denoiser" else component.flat_naming
        name = component.name_in(module, chosen).replace(".", "_")
        tail = tuple(layer.kernel) if layer.kind == "conv2d" else ()
        tensors[f"{prefix}_{name}.lora_down.weight"] = torch.ones(
            (1, layer.in_features, *tail), dtype=torch.float16
        )
        tensors[f"{prefix}_{name}.lora_up.weight"] = torch.ones(
            (layer.out_features, 1, *((1, 1) if tail else ())), dtype=torch.float16
        )
    save_file(tensors, path)
    return len(tensors) // 2


def unreadable_data():
    """Any attempt to read tensor data fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("detection read tensor data")

    return mock.patch.object(os, "pread", refuse)


CASES = {
    "sd1 unet + te": ("sd1", lambda c, p: ".attentions." in p or c == "text_encoder", "sd1"),
    "sd1 unet only": ("sd1", lambda c, p: c == "unet" and ".attentions." in p, "sd1"),
    "sd2 unet only": ("sd2", lambda c, p: c == "unet" and ".attentions." in p, "sd2"),
    "sd2 te only": ("sd2", lambda c, p: c == "text_encoder", "sd2"),
    "sdxl unet only": ("sdxl", lambda c, p: c == "unet" and ".attentions." in p, "sdxl"),
    "sdxl te2 only": ("sdxl", lambda c, p: c == "text_encoder_2", "sdxl"),
    "sd1 attn1 only": ("sd1", lambda c, p: c == "unet" and ".attn1." in p, "ambiguous"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_family_from_header_alone(case, tmp_path):
    family, keep, expected = CASES[case]
    path = tmp_path / "lora.safetensors"
    kohya_from_table(path, family, keep)
    with unreadable_data():
        result = loraformats.detect(path)
    assert (result.format, result.family) == ("kohya", expected), result.reasons
    assert result.reasons


def test_ambiguous_answer_lists_candidates_and_convert_asks_for_family(tmp_path, capsys):
    path = tmp_path / "attn1.safetensors"
    kohya_from_table(path, "sd1", lambda c, p: c == "unet" and ".attn1." in p)
    result = loraformats.detect(path)
    fitting = {c.name for c in result.families if c.score == 1.0 and not c.against}
    assert {"sd1", "sd2"} <= fitting
    assert main(["convert", str(path), "--to", "diffusers", "-o", str(tmp_path / "o.safetensors")]) == 4
    assert "--family" in capsys.readouterr().err
    assert (
        main(
            [
                "convert",
                str(path),
                "--to",
                "diffusers",
                "-o",
                str(tmp_path / "o.safetensors"),
                "--family",
                "sd2",
            ]
        )
        == 0
    )


def test_sdxl_in_both_namings_and_diffusers_output(tmp_path):
    for naming in ("ldm", "canonical"):
        path = tmp_path / f"{naming}.safetensors"
        kohya_from_table(path, "sdxl", lambda c, p: ".attentions." in p or c != "unet", naming=naming)
        with unreadable_data():
            assert loraformats.detect(path).family == "sdxl"
        converted = tmp_path / f"{naming}.diffusers.safetensors"
        loraformats.convert(path, "diffusers", converted)
        with unreadable_data():
            result = loraformats.detect(converted)
        assert (result.format, result.family) == ("diffusers", "sdxl")
        assert {c.name for c in result.components} == {"unet", "text_encoder", "text_encoder_2"}


def test_not_a_lora_is_unknown(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, path)
    result = loraformats.detect(path)
    assert (result.format, result.family) == ("unknown", "unknown")
