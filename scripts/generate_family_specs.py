"""Regenerate the Stable Diffusion family specs in `specs/families/` from the real model classes.

    python scripts/generate_family_specs.py           # write sd1.json, sd2.json, sdxl.json
    python scripts/generate_family_specs.py --check   # exit 1 and list differences if stale

The configs below are the published ones (runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0), kept as data so
that no weights or hub access are needed: the models are built on the meta device. Every value
that differs from the library default is spelled out, and so are the ones the tables depend on.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "specs" / "families"

# --- UNets (diffusers UNet2DConditionModel configs) -------------------------------------------

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD21_UNET: dict[str, Any] = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "num_class_embeds": None,
}

SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "class_embed_type": None,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "num_class_embeds": None,
    "upcast_attention": None,
    "resnet_time_scale_shift": "default",
    "projection_class_embeddings_input_dim": 2816,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

# --- Text encoders (transformers CLIPTextConfig) -----------------------------------------------

#: OpenAI CLIP ViT-L/14's text tower: SD 1.x's encoder and SDXL's first.
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
}

#: OpenCLIP ViT-H/14's text tower as diffusers ships it for SD 2.x: 23 of its 24 layers (SD 2
#: conditions on the penultimate layer, so the last one is dropped from the checkpoint).
OPENCLIP_H: dict[str, Any] = {
    **CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 512,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
}

#: OpenCLIP ViT-bigG/14's text tower: SDXL's second encoder (with its text projection).
OPENCLIP_BIGG: dict[str, Any] = {
    **CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}

#: Google T5 v1.1 XXL's encoder, as Flux and SD3 ship it (`text_encoder_2` / `text_encoder_3`).
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
}

# --- DiT denoisers (diffusers FluxTransformer2DModel / SD3Transformer2DModel configs) -----------

#: black-forest-labs/FLUX.1-dev (schnell lacks the guidance embedder; Kontext shares dev's layout).
FLUX1_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
}

#: lodestones/Chroma: FLUX.1 schnell's blocks without modulation, plus a guidance approximator.
CHROMA: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "approximator_num_channels": 64,
    "approximator_hidden_dim": 5120,
    "approximator_layers": 5,
}

#: black-forest-labs/FLUX.2-dev (the class's defaults): 8 double and 48 single blocks, 6144 wide.
FLUX2_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 8,
    "num_single_layers": 48,
    "attention_head_dim": 128,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "mlp_ratio": 3.0,
    "guidance_embeds": True,
}

#: stabilityai/stable-diffusion-3-medium-diffusers
SD3_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
#: stabilityai/stable-diffusion-3.5-medium: MMDiT-X, a second self-attention in blocks 0-12.
SD35_MEDIUM: dict[str, Any] = {
    **SD3_MEDIUM,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}
#: stabilityai/stable-diffusion-3.5-large
SD35_LARGE: dict[str, Any] = {
    **SD3_MEDIUM,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}

# --- Families ----------------------------------------------------------------------------------

FAMILIES: dict[str, dict[str, Any]] = {
    "sd1": {
        "label": "Stable Diffusion 1.x",
        "description": "SD 1.4/1.5 and fine-tunes: a 4-level UNet conditioned on CLIP ViT-L/14 (768).",
        "unet_config": SD15_UNET,
        "text_encoder_configs": [(CLIP_L, False, "clip_l")],
        "unet_flat_naming": "canonical",
    },
    "sd2": {
        "label": "Stable Diffusion 2.x",
        "description": "SD 2.0/2.1 (512 and 768-v): linear attention projections, OpenCLIP ViT-H/14 (1024).",
        "unet_config": SD21_UNET,
        "text_encoder_configs": [(OPENCLIP_H, False, "clip_h")],
        "unet_flat_naming": "canonical",
    },
    "sdxl": {
        "label": "Stable Diffusion XL",
        "description": "SDXL 1.0 base and fine-tunes: a 3-level UNet with deep transformers, conditioned "
        "on CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (2048); Kohya names its UNet modules the LDM way.",
        "unet_config": SDXL_UNET,
        "text_encoder_configs": [(CLIP_L, False, "clip_l"), (OPENCLIP_BIGG, True, "clip_g")],
        "unet_flat_naming": "ldm",
    },
}


def _tables() -> Any:
    """`loraformats_sd.tables`, also from a checkout where the package is not installed."""
    try:
        from loraformats_sd import tables
    except ImportError:
        sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
        from loraformats_sd import tables
    return tables


def _dit_tables() -> Any:
    _tables()  # puts plugins/ on the path if needed
    from loraformats_dit import tables

    return tables


def dit_families() -> dict[str, dict[str, Any]]:
    """The DiT families' arguments to `loraformats_dit.tables.family_spec`."""
    dit = _dit_tables()
    clip_l = dit.clip(CLIP_L, with_projection=True, slot=1, encoder="clip_l")
    clip_l_plain = dit.clip(CLIP_L, with_projection=False, slot=1, encoder="clip_l")
    clip_g = dit.clip(OPENCLIP_BIGG, with_projection=True, slot=2, encoder="clip_g")
    sd3_encoders = [clip_l, clip_g, dit.t5_component(T5_XXL, slot=3, slots=[3])]
    mmdit = "an MMDiT conditioned on CLIP ViT-L/14, OpenCLIP ViT-bigG/14 and T5-XXL"
    return {
        "flux1": {
            "label": "FLUX.1 (dev, schnell, Kontext)",
            "description": "Black Forest Labs' FLUX.1: 19 double-stream and 38 single-stream blocks "
            "(3072 wide), CLIP ViT-L/14 and T5-XXL. Original (BFL) checkpoints fuse q/k/v and "
            "single-block q/k/v/MLP; Kohya numbers T5 as te3 (OneTrainer as te2).",
            "denoiser": ("flux", FLUX1_DEV),
            # T5 is text_encoder_2 in diffusers; sd-scripts writes lora_te3_, OneTrainer lora_te2_
            "text_encoders": [clip_l_plain, dit.t5_component(T5_XXL, slot=2, slots=[3, 2])],
        },
        "chroma": {
            "label": "Chroma",
            "description": "lodestones' Chroma: FLUX.1's 19 double and 38 single blocks without their "
            "modulation layers, a distilled guidance approximator, and T5-XXL alone (sd-scripts: te3).",
            "denoiser": ("chroma", CHROMA),
            "text_encoders": [dit.t5_component(T5_XXL, slot=1, slots=[3, 1])],
        },
        "flux2": {
            "label": "FLUX.2 (dev)",
            "description": "Black Forest Labs' FLUX.2 dev: 8 double-stream and 48 single-stream blocks "
            "(6144 wide) with shared modulation; its Mistral text encoder has no table here.",
            "denoiser": ("flux2", FLUX2_DEV),
            "text_encoders": [],
        },
        "sd3": {
            "label": "Stable Diffusion 3 Medium",
            "description": f"SD3 Medium: {mmdit}; 24 joint blocks, 1536 wide.",
            "denoiser": ("sd3", SD3_MEDIUM),
            "text_encoders": sd3_encoders,
        },
        "sd3.5-medium": {
            "label": "Stable Diffusion 3.5 Medium",
            "description": f"SD3.5 Medium (MMDiT-X): {mmdit}; 24 joint blocks, 1536 wide, a second "
            "attention in blocks 0-12, RMS qk-norm.",
            "denoiser": ("sd3", SD35_MEDIUM),
            "text_encoders": sd3_encoders,
        },
        "sd3.5-large": {
            "label": "Stable Diffusion 3.5 Large",
            "description": f"SD3.5 Large: {mmdit}; 38 joint blocks, 2432 wide, RMS qk-norm.",
            "denoiser": ("sd3", SD35_LARGE),
            "text_encoders": sd3_encoders,
        },
    }


def build_specs() -> dict[str, dict[str, Any]]:
    """Every family's spec, freshly generated from the model classes."""
    tables = _tables()
    specs = {name: tables.family_spec(name, **family) for name, family in FAMILIES.items()}
    dit = _dit_tables()
    specs.update({name: dit.family_spec(name, **family) for name, family in dit_families().items()})
    return specs


def render() -> dict[Path, str]:
    """The text every spec file should have, by path."""
    tables = _tables()
    return {SPEC_DIR / f"{name}.json": tables.spec_json(spec) for name, spec in build_specs().items()}


def differences(expected: dict[Path, str], max_lines: int = 40) -> list[str]:
    """A readable summary of how the files on disk differ from `expected` (empty if they do not)."""
    report: list[str] = []
    for path, text in expected.items():
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if not path.exists():
            report.append(f"{shown}: missing")
            continue
        current = path.read_text()
        if current == text:
            continue
        diff = list(
            difflib.unified_diff(current.splitlines(), text.splitlines(), "on disk", "generated", lineterm="")
        )
        changed = sum(1 for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
        report.append(f"{shown}: {changed} lines differ")
        report.extend("    " + line for line in diff[:max_lines])
        if len(diff) > max_lines:
            report.append(f"    ... ({len(diff) - max_lines} more diff lines)")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    args = parser.parse_args(argv)
    expected = render()
    report = differences(expected)
    if args.check:
        if report:
            print("family specs are stale; run: python scripts/generate_family_specs.py", file=sys.stderr)
            print("\n".join(report), file=sys.stderr)
            return 1
        print(f"{len(expected)} family specs are up to date")
        return 0
    SPEC_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in expected.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if not report:
        print(f"{len(expected)} family specs were already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
