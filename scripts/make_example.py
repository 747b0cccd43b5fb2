"""Write the bundled example: a tiny-rank Kohya LoRA with the real SD 1.5 module names and shapes.

    python scripts/make_example.py  [-o examples/sd15_tiny_kohya.safetensors]

It mimics what sd-scripts writes with `network_dim=4, network_alpha=1, conv_dim=2, conv_alpha=1`
("LoRA-C3Lier"): attention and text-encoder modules at rank 4, and (to keep the file small) the
ResNet and sampler convs of the outermost 320-channel blocks at rank 2; fp16 factors and alphas,
and `ss_*` / `modelspec.*` metadata. Factors are random (seeded), never the
identity-like initialisation, so a conversion mistake shows up as a numeric difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraformats.families import Family, builtin_spec

CONV_BLOCKS = ("down_blocks.0.resnets.", "down_blocks.0.downsamplers.", "up_blocks.3.resnets.")


def kohya_targets(family: Family) -> dict[str, tuple[str, str]]:
    """sd-scripts' LoRA-C3Lier targets: attention blocks, ResNets, samplers, and the CLIP attention/MLP."""
    targets = {}
    for component, path, layer in family.iter_modules():
        if layer.kind not in ("linear", "conv2d"):
            continue
        if component.role == "denoiser":
            if ".attentions." not in path and not path.startswith(CONV_BLOCKS):
                continue
            prefix = "lora_unet"
        else:
            if ".self_attn." not in path and ".mlp." not in path:
                continue
            prefix = "lora_te"
        targets[f"{prefix}_{path.replace('.', '_')}"] = (component.name, path)
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="examples/sd15_tiny_kohya.safetensors")
    args = parser.parse_args()
    family = Family.from_spec_file("sd1", "Stable Diffusion 1.x", builtin_spec("sd1"))
    generator = torch.Generator().manual_seed(1234)
    tensors = {}
    for name, (component, path) in kohya_targets(family).items():
        layer = family.components[component].modules[path]
        is_kxk = layer.kind == "conv2d" and layer.kernel != (1, 1)
        rank = 2 if is_kxk else 4
        tail = tuple(layer.kernel) if layer.kind == "conv2d" else ()
        up_tail = (1, 1) if layer.kind == "conv2d" else ()
        down = torch.randn((rank, layer.in_features, *tail), generator=generator) / layer.in_features**0.5
        up = torch.randn((layer.out_features, rank, *up_tail), generator=generator) * 0.1
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(1.0).half()
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "4",
        "ss_network_alpha": "1.0",
        "ss_network_args": '{"conv_dim": "2", "conv_alpha": "1"}',
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": "sd15_tiny_example",
        "ss_tag_frequency": '{"10_example": {"example style": 10}}',
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "sd15_tiny_example",
        "modelspec.trigger_phrase": "example style",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.output, metadata=metadata)
    print(f"wrote {args.output}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
