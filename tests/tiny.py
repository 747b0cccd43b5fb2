"""Tiny variants of the SD families, built from the same generators as the production specs.

They register through the public `register_families` hook (see conftest.py), exactly like the
built-in families, and back tiny real pipelines for the consumer tests.
"""

from __future__ import annotations

import functools
from typing import Any

from loraformats.families import Family
from loraformats_sd.tables import family_spec

TE_SMALL = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 1000,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

UNET_SD1 = {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
UNET_SD2 = {
    **UNET_SD1,
    "cross_attention_dim": 48,
    "use_linear_projection": True,
    "attention_head_dim": (4, 8),
}
UNET_SDXL = {
    "sample_size": 8,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "cross_attention_dim": 64,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "norm_num_groups": 16,
}

#: name -> (UNet config, [(text-encoder config, with projection, encoder)], UNet naming Kohya uses)
TINY: dict[str, tuple[dict, list[tuple[dict, bool, str]], str]] = {
    "tiny-sd1": (UNET_SD1, [(TE_SMALL, False, "clip_l")], "canonical"),
    "tiny-sd2": (
        UNET_SD2,
        [({**TE_SMALL, "hidden_size": 48, "hidden_act": "gelu"}, False, "clip_h")],
        "canonical",
    ),
    "tiny-sdxl": (
        UNET_SDXL,
        [
            (TE_SMALL, False, "clip_l"),
            ({**TE_SMALL, "projection_dim": 32, "hidden_act": "gelu"}, True, "clip_g"),
        ],
        "ldm",
    ),
}


@functools.cache
def tiny_vae():
    """The smallest AutoencoderKL a pipeline accepts (LoRAs never touch it)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
    )


def tiny_family(name: str) -> Family:
    unet, encoders, naming = TINY[name]
    return Family.from_spec(family_spec(name, name, "tiny test variant", unet, encoders, naming))


def build_pipeline(name: str, seed: int = 0) -> Any:
    """A real diffusers pipeline of the tiny family, random weights, fixed seed, no downloads."""
    import torch
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config, encoders, _ = TINY[name]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    vae = tiny_vae()
    text_encoders = [
        (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
        for config, projection, _ in encoders
    ]
    common = {"vae": vae, "unet": unet, "scheduler": DDIMScheduler()}
    if len(text_encoders) == 2:
        return StableDiffusionXLPipeline(
            text_encoder=text_encoders[0],
            text_encoder_2=text_encoders[1],
            tokenizer=None,
            tokenizer_2=None,
            **common,
        )
    return StableDiffusionPipeline(
        text_encoder=text_encoders[0],
        tokenizer=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        **common,
    )


# --- Diffusion transformers ----------------------------------------------------------------------

TINY_FLUX = {
    "patch_size": 1,
    "in_channels": 8,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 40,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
TINY_SD3 = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 3,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 40,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 64,
    "out_channels": 4,
    "pos_embed_max_size": 16,
    "dual_attention_layers": (0,),
    "qk_norm": "rms_norm",
}
T5_SMALL = {
    "vocab_size": 1000,
    "d_model": 40,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
}
CLIP_G_SMALL = {**TE_SMALL, "hidden_size": 48, "projection_dim": 32, "hidden_act": "gelu"}
CLIP_L_SMALL = {**TE_SMALL, "projection_dim": 32}


@functools.cache
def tiny_dit_family(name: str) -> Family:
    from loraformats_dit.tables import clip, family_spec, t5_component

    if name == "tiny-flux":
        encoders = [
            clip(TE_SMALL, with_projection=False, slot=1, encoder="clip_l"),
            t5_component(T5_SMALL, slot=2, slots=[3, 2]),
        ]
        spec = family_spec(name, name, "tiny test variant", ("flux", TINY_FLUX), encoders)
    elif name == "tiny-sd3":
        encoders = [
            clip(CLIP_L_SMALL, with_projection=True, slot=1, encoder="clip_l"),
            clip(CLIP_G_SMALL, with_projection=True, slot=2, encoder="clip_g"),
            t5_component(T5_SMALL, slot=3, slots=[3]),
        ]
        spec = family_spec(name, name, "tiny test variant", ("sd3", TINY_SD3), encoders)
    else:
        raise KeyError(name)
    return Family.from_spec(spec)


def build_dit_pipeline(name: str, seed: int = 0) -> Any:
    """A real FluxPipeline / StableDiffusion3Pipeline of the tiny family, random weights, no downloads."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    torch.manual_seed(seed)
    vae = tiny_vae()
    common = {
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "tokenizer": None,
        "tokenizer_2": None,
    }
    t5 = T5EncoderModel(T5Config(**T5_SMALL))
    if name == "tiny-flux":
        return FluxPipeline(
            transformer=FluxTransformer2DModel(**TINY_FLUX),
            text_encoder=CLIPTextModel(CLIPTextConfig(**TE_SMALL)),
            text_encoder_2=t5,
            **common,
        )
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY_SD3),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_SMALL)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_SMALL)),
        text_encoder_3=t5,
        tokenizer_3=None,
        **common,
    )
