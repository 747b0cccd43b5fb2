"""The DiT family tables (FLUX.1, SD3/3.5) agree with diffusers' own single-file converters.

An original (BFL / MMDiT) checkpoint is built from our tables alone: each group's members stacked,
rows put in the naming's order. diffusers' converter (`convert_flux_transformer_checkpoint_to_diffusers`,
`convert_sd3_transformer_checkpoint_to_diffusers`) must turn it back into exactly the per-module
tensors we started from. Every row of every module carries a unique value, so a wrong group order,
width or shift/scale swap moves values and fails. The weights are (out, 1) columns: the converters
only cut rows, so production-size tables (Flux's converter hard-codes a width of 3072) stay small.
"""

from __future__ import annotations

import pytest

from loraformats.families import Family
from loraformats.plugins import registry

torch = pytest.importorskip("torch")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")

#: Parameters the converters expect that no LoRA targets (qk-norm scales, positional embeddings).
FLUX_EXTRAS = (
    "double_blocks.{i}.img_attn.norm.query_norm.scale",
    "double_blocks.{i}.img_attn.norm.key_norm.scale",
    "double_blocks.{i}.txt_attn.norm.query_norm.scale",
    "double_blocks.{i}.txt_attn.norm.key_norm.scale",
)
FLUX_SINGLE_EXTRAS = ("single_blocks.{i}.norm.query_norm.scale", "single_blocks.{i}.norm.key_norm.scale")


def original_checkpoint(family: Family, suffixes: tuple[str, ...] = ("weight", "bias")) -> tuple[dict, dict]:
    """(original checkpoint, expected diffusers tensors) built from the family's tables."""
    component = family.components["transformer"]
    naming = component.native_naming
    expected: dict[str, torch.Tensor] = {}
    counter = 0
    for path, layer in component.modules.items():
        if path in component.groups:
            continue
        for suffix in suffixes:
            values = torch.arange(counter, counter + layer.out_features, dtype=torch.float64)
            expected[f"{path}.{suffix}"] = values.reshape(-1, 1) if suffix == "weight" else values
            counter += layer.out_features
    checkpoint: dict[str, torch.Tensor] = {}
    for path in component.named_paths(naming):
        name = component.name_in(path, naming)
        members = component.groups.get(path, (path,))
        for suffix in suffixes:
            stacked = torch.cat([expected[f"{m}.{suffix}"] for m in members])
            order = component.row_order(path, naming)
            if order is not None:
                stacked = torch.cat([stacked[start:stop] for start, stop in order])
            checkpoint[f"{name}.{suffix}"] = stacked
    return checkpoint, expected


def kohya_header(family: str, naming: str, paths: list[str]) -> bytes:
    """The header (no data) of a rank-4 Kohya file adapting `paths` of the family's transformer."""
    import json
    import struct

    component = registry.families()[family].components["transformer"]
    doc, offset = {}, 0
    for path in paths:
        layer = component.modules[path]
        stem = "lora_unet_" + component.name_in(path, naming).replace(".", "_")
        for suffix, shape in (
            (".lora_down.weight", [4, layer.in_features]),
            (".lora_up.weight", [layer.out_features, 4]),
        ):
            size = shape[0] * shape[1] * 2
            doc[stem + suffix] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    raw = json.dumps(doc).encode()
    return struct.pack("<Q", len(raw)) + raw


def blocks(component, prefix: str) -> int:
    return len({p.split(".")[1] for p in component.modules if p.startswith(prefix)})


def with_qk_norms(checkpoint: dict, component) -> dict:
    """The checkpoint plus the qk-norm scales of every block, which the converters expect."""
    for i in range(blocks(component, "transformer_blocks.")):
        checkpoint.update({name.format(i=i): torch.ones(1) for name in FLUX_EXTRAS})
    for i in range(blocks(component, "single_transformer_blocks.")):
        checkpoint.update({name.format(i=i): torch.ones(1) for name in FLUX_SINGLE_EXTRAS})
    return checkpoint


def test_flux1_tables_match_diffusers_single_file_conversion():
    family = registry.families()["flux1"]
    checkpoint, expected = original_checkpoint(family)
    component = family.components["transformer"]
    with_qk_norms(checkpoint, component)
    converted = single_file.convert_flux_transformer_checkpoint_to_diffusers(dict(checkpoint))
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key
    assert len(expected) == 2 * (len(component.modules) - len(component.groups))


@pytest.mark.parametrize("name", ["sd3", "sd3.5-medium", "sd3.5-large"])
def test_sd3_tables_match_diffusers_single_file_conversion(name):
    family = registry.families()[name]
    checkpoint, expected = original_checkpoint(family)
    checkpoint["pos_embed"] = torch.zeros(1)
    config = family.components["transformer"].modules
    if any("attn.norm_q" in key for key in config):  # never: qk norms are not LoRA targets
        pytest.fail("qk-norm scales must not be in the module table")
    if name != "sd3":  # 3.5 has RMS qk-norm; the converter expects its scales
        layers = blocks(family.components["transformer"], "transformer_blocks.")
        for i in range(layers):
            for block in ("x_block", "context_block"):
                for norm in ("ln_q", "ln_k"):
                    checkpoint[f"joint_blocks.{i}.{block}.attn.{norm}.weight"] = torch.ones(1)
            if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in checkpoint:
                for norm in ("ln_q", "ln_k"):
                    checkpoint[f"joint_blocks.{i}.x_block.attn2.{norm}.weight"] = torch.ones(1)
    converted = single_file.convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))
    for key, tensor in expected.items():
        assert torch.equal(converted[key].reshape(tensor.shape), tensor), key


def test_tiny_sd3_tables_cover_the_real_model_and_its_conversion():
    """A tiny SD3 built from a config: its spec lists every Linear/Conv2d of the real model, and
    diffusers' converter maps our original checkpoint of it back to its own state dict."""
    from diffusers import SD3Transformer2DModel

    from tiny import TINY_SD3, tiny_dit_family

    family = tiny_dit_family("tiny-sd3")
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY_SD3)
    state = model.state_dict()
    component = family.components["transformer"]
    weights = {key.removesuffix(".weight") for key in state if key.endswith(".weight")}
    targets = {p for p in component.modules if p not in component.groups}
    assert targets <= weights
    assert {w for w in weights if "norm_" not in w and w not in targets} == set()
    checkpoint = {}
    naming = component.native_naming
    for path in component.named_paths(naming):
        members = component.groups.get(path, (path,))
        for suffix in ("weight", "bias"):
            stacked = torch.cat([state[f"{m}.{suffix}"] for m in members])
            order = component.row_order(path, naming)
            if order is not None:
                stacked = torch.cat([stacked[start:stop] for start, stop in order])
            checkpoint[f"{component.name_in(path, naming)}.{suffix}"] = stacked
    checkpoint["pos_embed"] = state["pos_embed.pos_embed"]
    for i in range(TINY_SD3["num_layers"]):
        for block, prefix in (("x_block", "attn.norm_"), ("context_block", "attn.norm_added_")):
            for norm in ("q", "k"):
                checkpoint[f"joint_blocks.{i}.{block}.attn.ln_{norm}.weight"] = state[
                    f"transformer_blocks.{i}.{prefix}{norm}.weight"
                ]
        if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in checkpoint:
            for norm in ("q", "k"):
                checkpoint[f"joint_blocks.{i}.x_block.attn2.ln_{norm}.weight"] = state[
                    f"transformer_blocks.{i}.attn2.norm_{norm}.weight"
                ]
    converted = single_file.convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert converted.keys() == state.keys()
    for key, tensor in state.items():
        assert torch.equal(converted[key], tensor), key


def test_flux_groups_and_swaps_are_declared():
    component = registry.families()["flux1"].components["transformer"]
    qkv = component.modules["transformer_blocks.0.attn.to_qkv"]
    linear1 = component.modules["single_transformer_blocks.0.attn.to_qkv_mlp_proj"]
    assert (qkv.in_features, qkv.out_features) == (3072, 9216)
    assert (linear1.in_features, linear1.out_features) == (3072, 21504)
    assert [
        component.modules[m].out_features
        for m in component.groups["single_transformer_blocks.0.attn.to_qkv_mlp_proj"]
    ] == [3072, 3072, 3072, 12288]
    assert component.row_order("norm_out.linear", "bfl") == ((3072, 6144), (0, 3072))
    assert component.row_order("transformer_blocks.0.norm1.linear", "bfl") is None  # 1:1, no reorder
    assert not component.nameable("transformer_blocks.0.attn.to_q", "bfl")
    assert not component.nameable("transformer_blocks.0.attn.to_qkv", "canonical")


def test_text_encoder_numbering_comes_from_the_family():
    from loraformats.families import ComponentHint

    flux = registry.families()["flux1"]
    t5 = flux.components["text_encoder_2"]
    assert t5.encoder == "t5xxl" and t5.slots == (3, 2)  # sd-scripts te3, OneTrainer te2
    assert flux.find_components(ComponentHint(role="text_encoder", slot=3)) == [t5]
    assert flux.find_components(ComponentHint(role="text_encoder", slot=2)) == [t5]
    sd3 = registry.families()["sd3.5-large"]
    assert [c.encoder for c in sd3.text_encoders()] == ["clip_l", "clip_g", "t5xxl"]
    assert sd3.find_components(ComponentHint(role="text_encoder", slot=2))[0].encoder == "clip_g"


def test_flux2_tables_match_diffusers_single_file_conversion():
    """FLUX.2 dev: shared modulation, fused q/k/v in double blocks, one fused projection per single
    block that diffusers keeps whole, and the final adaLN swap."""
    family = registry.families()["flux2"]
    checkpoint, expected = original_checkpoint(family, ("weight",))  # FLUX.2's Linears have no bias
    component = family.components["transformer"]
    with_qk_norms(checkpoint, component)
    converted = single_file.convert_flux2_transformer_checkpoint_to_diffusers(dict(checkpoint))
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key
    assert component.modules["single_transformer_blocks.0.attn.to_qkv_mlp_proj"].out_features == 55296


def test_flux1_and_flux2_are_told_apart_by_shape():
    import loraformats

    qkv = ["transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_out.0"]
    with_modulation = [*qkv, "transformer_blocks.0.norm1.linear"]
    assert loraformats.detect(kohya_header("flux1", "bfl", with_modulation)).family == "flux1"
    shared = loraformats.detect(
        kohya_header("flux1", "bfl", qkv)
    )  # Chroma has these too, with the same shapes
    assert shared.family == "ambiguous"
    assert {"flux1", "chroma"} <= {c.name for c in shared.families if c.score == 1.0}
    second = loraformats.detect(kohya_header("flux2", "bfl", qkv))
    assert second.family == "flux2"
    assert any("not flux1" in reason for reason in second.reasons)


def test_chroma_tables_match_diffusers_single_file_conversion():
    """Chroma: FLUX.1's fused groups without modulation layers, plus the guidance approximator."""
    family = registry.families()["chroma"]
    checkpoint, expected = original_checkpoint(family)
    component = family.components["transformer"]
    with_qk_norms(checkpoint, component)
    for i in range(5):
        checkpoint[f"distilled_guidance_layer.norms.{i}.scale"] = torch.ones(1)
    converted = single_file.convert_chroma_transformer_checkpoint_to_diffusers(dict(checkpoint))
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key
    assert "transformer_blocks.0.norm1.linear" not in component.modules
    assert family.components["text_encoder"].encoder == "t5xxl"


def test_sd3_medium_and_35_large_are_told_apart_and_35_medium_by_its_second_attention():
    import loraformats

    blocks0 = ["transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.ff.net.0.proj"]
    large = loraformats.detect(kohya_header("sd3.5-large", "mmdit", blocks0))
    assert large.family == "sd3.5-large"
    assert any(r.startswith("not sd3:") and "2432" in r for r in large.reasons)
    medium = loraformats.detect(kohya_header("sd3", "mmdit", blocks0))  # 3 and 3.5 Medium share these layers
    assert medium.family == "ambiguous"
    assert {"sd3", "sd3.5-medium"} == {c.name for c in medium.families if c.score == 1.0}
    dual = loraformats.detect(
        kohya_header("sd3.5-medium", "mmdit", [*blocks0, "transformer_blocks.0.attn2.to_qkv"])
    )
    assert dual.family == "sd3.5-medium"
