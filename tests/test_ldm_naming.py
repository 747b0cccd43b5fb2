"""Our LDM naming agrees with diffusers' own LDM→diffusers converter, on real (tiny) UNets.

A diffusers state dict renamed with `ldm_name` must be exactly what an original checkpoint holds:
`convert_ldm_unet_checkpoint` has to turn it back into the same keys and the same tensors.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from loraformats_sd.tables import ldm_name, ldm_naming, unet_component
from tiny import UNET_SD1, UNET_SDXL

LDM_PREFIX = "model.diffusion_model."

# SD 2's layout, with one resnet per level and an attention in every block but the deepest.
SD2_LIKE = {
    "sample_size": 8,
    "block_out_channels": (32, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 24,
    "attention_head_dim": (4, 8, 8),
    "use_linear_projection": True,
    "norm_num_groups": 8,
}

CONFIGS = {"sd1-like": UNET_SD1, "sd2-like": SD2_LIKE, "sdxl-like": UNET_SDXL}


def build(config: dict) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def to_ldm_checkpoint(state_dict: dict, config: dict) -> dict:
    """The state dict as an original LDM/SGM checkpoint names it."""
    checkpoint = {}
    for key, tensor in state_dict.items():
        module, _, parameter = key.rpartition(".")
        checkpoint[f"{LDM_PREFIX}{ldm_name(module, config)}.{parameter}"] = tensor
    return checkpoint


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_diffusers_converter_inverts_ldm_naming(config):
    model = build(config)
    state_dict = model.state_dict()
    checkpoint = to_ldm_checkpoint(state_dict, config)
    assert len(checkpoint) == len(state_dict)  # no two parameters share an LDM name

    converted = convert_ldm_unet_checkpoint(checkpoint, dict(model.config))

    assert sorted(converted) == sorted(state_dict)
    for key, tensor in state_dict.items():
        assert converted[key] is not None, key
        assert torch.equal(converted[key], tensor), key


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_component_covers_every_parameterised_module(config):
    """The spec table lists exactly the modules that hold UNet weights, and names them all in LDM."""
    component = unet_component(config, flat_naming="ldm")
    owners = {key.rpartition(".")[0] for key in build(config).state_dict()}
    assert set(component["modules"]) == owners
    assert set(component["namings"]["ldm"]) == owners
    assert component["namings"]["ldm"] == ldm_naming(component["modules"], config)


def test_sampler_positions_follow_the_config():
    """An up block's upsampler follows its attention when it has one: SD1 `.1.conv`, SDXL `.2.conv`."""
    assert ldm_name("up_blocks.0.upsamplers.0.conv", UNET_SD1) == "output_blocks.2.1.conv"
    assert ldm_name("up_blocks.0.upsamplers.0.conv", UNET_SDXL) == "output_blocks.2.2.conv"
    assert ldm_name("down_blocks.0.downsamplers.0.conv", UNET_SDXL) == "input_blocks.3.0.op"
    assert ldm_name("down_blocks.1.downsamplers.0.conv", SD2_LIKE) == "input_blocks.4.0.op"
    assert ldm_name("up_blocks.1.upsamplers.0.conv", SD2_LIKE) == "output_blocks.3.2.conv"
    assert ldm_name("add_embedding.linear_2", UNET_SDXL) == "label_emb.0.2"
    assert ldm_name("mid_block.resnets.1.conv_shortcut", UNET_SD1) == "middle_block.2.skip_connection"


@pytest.mark.parametrize(
    "path",
    [
        "down_blocks.0.attentions.0.proj_in",  # SDXL-like's first down block has no attention
        "down_blocks.1.resnets.2.conv1",  # only two resnets per down block
        "down_blocks.2.resnets.0.conv1",  # only two down blocks
        "up_blocks.1.attentions.0.proj_in",
        "down_blocks.1.downsamplers.0.conv",  # the deepest level is not downsampled
        "up_blocks.1.upsamplers.0.conv",
        "mid_block.resnets.0.dropout",
        "time_embedding.cond_proj",
    ],
)
def test_paths_without_ldm_equivalent_are_refused(path):
    with pytest.raises(ValueError, match=r"no LDM equivalent|the config has"):
        ldm_name(path, UNET_SDXL)
