"""The frozen family specs: up to date with the model classes, loadable, plausible, unambiguous."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from loraformats.families import CANONICAL, Family, Layer

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "specs" / "families"
SCRIPT = ROOT / "scripts" / "generate_family_specs.py"
LABELS = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL",
    "flux1": "FLUX.1",
    "flux2": "FLUX.2 (dev)",
    "chroma": "Chroma",
    "sd3": "Stable Diffusion 3 Medium",
    "sd3.5-medium": "Stable Diffusion 3.5 Medium",
    "sd3.5-large": "Stable Diffusion 3.5 Large",
}


def load_script():
    spec = importlib.util.spec_from_file_location("generate_family_specs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SD_FAMILIES = ["sd1", "sd2", "sdxl"]  # the UNet families; DiT families: test_dit_families.py


@pytest.fixture(scope="module", params=SD_FAMILIES)
def family(request) -> Family:
    return Family.from_spec_file(request.param, LABELS[request.param], SPEC_DIR / f"{request.param}.json")


def load(name: str) -> Family:
    return Family.from_spec_file(name, LABELS[name], SPEC_DIR / f"{name}.json")


def layer_count(component, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for path in component.modules if (m := pattern.match(path))})


# --- (a) drift ----------------------------------------------------------------------------------


def test_specs_on_disk_match_a_fresh_generation():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    script = load_script()
    expected = script.render()
    assert {path.name for path in expected} == {f"{name}.json" for name in LABELS}
    report = script.differences(expected)
    assert not report, "stale specs; run `python scripts/generate_family_specs.py`:\n" + "\n".join(report)


def test_spec_files_are_one_module_per_line():
    for name in LABELS:
        text = (SPEC_DIR / f"{name}.json").read_text()
        lines = {line.strip().rstrip(",") for line in text.splitlines()}
        for component in json.loads(text)["components"].values():
            for path, entry in component["modules"].items():
                assert f"{json.dumps(path)}: {json.dumps(entry)}" in lines, (name, path)


# --- (b) loading and plausibility ---------------------------------------------------------------


def test_specs_load_with_expected_components(family):
    expected = {"sd1": ["unet", "text_encoder"], "sd2": ["unet", "text_encoder"]}
    assert list(family.components) == expected.get(family.name, ["unet", "text_encoder", "text_encoder_2"])
    unet = family.components["unet"]
    assert (unet.role, unet.slot) == ("denoiser", None)
    assert unet.flat_naming == ("ldm" if family.name == "sdxl" else CANONICAL)
    assert [c.slot for c in family.text_encoders()] == list(range(1, len(family.components)))
    for encoder in family.text_encoders():
        assert encoder.path_aliases == ("text_model.",)
        assert all(p.startswith("text_model.") or p == "text_projection" for p in encoder.modules)


def test_entries_round_trip_through_layer(family):
    spec = json.loads(family.spec_path.read_text())
    for name, component in family.components.items():
        for path, layer in component.modules.items():
            assert layer.to_spec() == spec["components"][name]["modules"][path]


@pytest.mark.parametrize(
    ("name", "context_dim", "proj_in", "attention_linears", "encoder_layers"),
    [
        ("sd1", 768, Layer("conv2d", 320, 320, (1, 1)), 192 - 32, [12]),
        ("sd2", 1024, Layer("linear", 320, 320), 192, [23]),
        ("sdxl", 2048, Layer("linear", 640, 640), 722, [12, 32]),
    ],
)
def test_plausible_geometry(name, context_dim, proj_in, attention_linears, encoder_layers):
    family = load(name)
    unet = family.components["unet"]
    attn2 = [layer for path, layer in unet.modules.items() if path.endswith(".attn2.to_k")]
    assert attn2 and all(layer.in_features == context_dim for layer in attn2)
    first_attention = "down_blocks.1" if name == "sdxl" else "down_blocks.0"  # SDXL's level 0 has none
    assert unet.modules[f"{first_attention}.attentions.0.proj_in"] == proj_in
    assert unet.modules["conv_in"] == Layer("conv2d", 4, 320, (3, 3))
    # sd-scripts' "create LoRA for U-Net: 192 / 722 modules" counts these (SD1's 32 are 1x1 convs).
    linears = [p for p, layer in unet.modules.items() if ".attentions." in p and layer.kind == "linear"]
    assert len(linears) == attention_linears
    assert [layer_count(te, "text_model.encoder.layers.") for te in family.text_encoders()] == encoder_layers
    for te in family.text_encoders():
        hidden = te.modules["text_model.final_layer_norm"].out_features
        assert te.modules["text_model.encoder.layers.0.self_attn.q_proj"] == Layer("linear", hidden, hidden)
        assert ("text_projection" in te.modules) == (te.slot == 2)


def test_sdxl_specifics():
    family = load("sdxl")
    unet, te2 = family.components["unet"], family.components["text_encoder_2"]
    assert unet.modules["add_embedding.linear_1"] == Layer("linear", 2816, 1280)
    assert layer_count(unet, "down_blocks.2.attentions.0.transformer_blocks.") == 10
    assert layer_count(unet, "down_blocks.1.attentions.0.transformer_blocks.") == 2
    assert "down_blocks.0.attentions.0.proj_in" not in unet.modules
    assert te2.modules["text_projection"] == Layer("linear", 1280, 1280)
    assert te2.modules["text_model.encoder.layers.31.mlp.fc1"] == Layer("linear", 1280, 5120)


@pytest.mark.parametrize(
    ("name", "path", "ldm"),
    [
        (
            "sdxl",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        ),
        ("sdxl", "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("sdxl", "down_blocks.0.resnets.0.norm1", "input_blocks.1.0.in_layers.0"),
        ("sdxl", "down_blocks.1.resnets.0.time_emb_proj", "input_blocks.4.0.emb_layers.1"),
        ("sdxl", "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("sdxl", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("sdxl", "mid_block.attentions.0.proj_out", "middle_block.1.proj_out"),
        ("sdxl", "mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
        ("sdxl", "up_blocks.0.resnets.2.norm2", "output_blocks.2.0.out_layers.0"),
        ("sdxl", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("sdxl", "up_blocks.1.attentions.2.norm", "output_blocks.5.1.norm"),
        ("sdxl", "time_embedding.linear_2", "time_embed.2"),
        ("sdxl", "add_embedding.linear_1", "label_emb.0.0"),
        ("sdxl", "conv_norm_out", "out.0"),
        ("sdxl", "conv_out", "out.2"),
        ("sd1", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        ("sd1", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("sd1", "down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
        (
            "sd2",
            "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
            "output_blocks.11.1.transformer_blocks.0.ff.net.2",
        ),
    ],
)
def test_ldm_names(name, path, ldm):
    unet = load(name).components["unet"]
    assert unet.name_in(path, "ldm") == ldm
    assert unet.resolve_flat(ldm.replace(".", "_")) == (path, "ldm")
    assert unet.resolve_dotted(ldm) == (path, "ldm")


def test_text_encoder_names_resolve_with_and_without_the_wrapper():
    te2 = load("sdxl").components["text_encoder_2"]
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    assert te2.resolve_flat("text_model_encoder_layers_0_self_attn_q_proj") == (path, CANONICAL)
    assert te2.resolve_dotted("encoder.layers.0.self_attn.q_proj") == (path, CANONICAL)
    assert te2.resolve_dotted("text_projection") == ("text_projection", CANONICAL)


# --- (c) unambiguous names ----------------------------------------------------------------------


def test_every_name_resolves_back_to_its_module(family):
    for component in family.components.values():
        for naming in component.naming_names():
            names = [component.name_in(path, naming) for path in component.modules]
            assert len(set(names)) == len(names), f"{component.name}: duplicate {naming} names"
            for path, name in zip(component.modules, names, strict=True):
                flat = component.resolve_flat(name.replace(".", "_"))
                assert flat is not None and flat[0] == path, (component.name, naming, name, flat)
                dotted = component.resolve_dotted(name)
                assert dotted is not None and dotted[0] == path, (component.name, naming, name, dotted)


def test_flattened_names_are_unique_across_namings(family):
    for component in family.components.values():
        owner: dict[str, str] = {}
        for naming in component.naming_names():
            for path in component.modules:
                flat = component.name_in(path, naming).replace(".", "_")
                assert owner.setdefault(flat, path) == path, f"{component.name}: {flat!r} is ambiguous"
