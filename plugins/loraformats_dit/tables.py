"""Generators for the DiT family specs (Flux.1, SD3/3.5): module tables read off the real classes.

The canonical paths are the diffusers/transformers module names of models built on the meta
device. The original checkpoint namings (BFL for Flux, MMDiT for SD3) are derived from each config
with the same rules as diffusers' own single-file converters
(`convert_flux_transformer_checkpoint_to_diffusers`, `convert_sd3_transformer_checkpoint_to_diffusers`),
including the fused groups (BFL's `img_attn.qkv` holds `to_q`, `to_k`, `to_v`; `linear1` holds those
and `proj_mlp`) and the rows those checkpoints order differently (adaLN shift/scale halves). Widths
come from the model, never from constants, so tiny test configs get correct tables too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from loraformats_sd.tables import SCHEMA, _jsonable, clip_component, layer_entry

if TYPE_CHECKING:
    from torch import nn

GENERATOR = "scripts/generate_family_specs.py"

#: Flux (BFL) names of diffusers paths, inside a double block (`transformer_blocks.N.`).
FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_qkv": "img_attn.qkv",
    "attn.to_added_qkv": "txt_attn.qkv",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
#: ... inside a single block (`single_transformer_blocks.N.`).
FLUX_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.to_qkv_mlp_proj": "linear1",
    "proj_out": "linear2",
}
FLUX_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
#: Fused groups: group path (relative to its block) -> member paths, in row order.
FLUX_DOUBLE_GROUPS = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
FLUX_SINGLE_GROUPS = {
    "attn.to_qkv_mlp_proj": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),  # XLabs' single-block qkv: linear1's first rows
}
#: FLUX.1's (and Chroma's) blocks: diffusers block list -> (BFL block list, names inside a block).
FLUX_BLOCKS = {
    "transformer_blocks": ("double_blocks", FLUX_DOUBLE),
    "single_transformer_blocks": ("single_blocks", FLUX_SINGLE),
}
#: XLabs' attention-processor LoRAs (x-flux): the modules it trains, named after its processors.
XLABS_DOUBLE = {
    "attn.to_qkv": "processor.qkv_lora1",
    "attn.to_added_qkv": "processor.qkv_lora2",
    "attn.to_out.0": "processor.proj_lora1",
    "attn.to_add_out": "processor.proj_lora2",
}
XLABS_SINGLE = {"attn.to_qkv": "processor.qkv_lora", "proj_out": "processor.proj_lora"}

#: FLUX.2 (BFL) names: modulation is shared by all blocks, the single block's fused projection is
#: one diffusers module too (`attn.to_qkv_mlp_proj`), so only the double blocks' q/k/v are groups.
FLUX2_DOUBLE = {
    "attn.to_qkv": "img_attn.qkv",
    "attn.to_added_qkv": "txt_attn.qkv",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
FLUX2_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
FLUX2_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}

#: SD3 (MMDiT) names inside a joint block (`transformer_blocks.N.` -> `joint_blocks.N.`).
MMDIT_BLOCK = {
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "attn.to_qkv": "x_block.attn.qkv",
    "attn.to_added_qkv": "context_block.attn.qkv",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_qkv": "x_block.attn2.qkv",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
MMDIT_TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
MMDIT_GROUPS = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "attn2.to_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}

BLOCK = re.compile(r"^(?P<blocks>[a-z_]+)\.(?P<index>\d+)\.(?P<rest>.+)$")


def linear_table(model: nn.Module) -> dict[str, list]:
    """Every Linear and Conv2d in model order. Other parameter holders must be norms (LayerNorm,
    RMSNorm, T5's LayerNorm: `norm` entries when they have a weight) or embeddings, or it is an error."""
    from torch import nn

    table: dict[str, list] = {}
    for path, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            table[path] = layer_entry(module)
        elif isinstance(module, nn.Embedding) or not own:
            continue
        elif "Norm" in type(module).__name__ and set(own) <= {"weight", "bias"} and own["weight"].dim() == 1:
            table[path] = ["norm", own["weight"].shape[0], own["weight"].shape[0]]
        else:
            raise ValueError(f"{path!r} ({type(module).__name__}) holds parameters but has no spec kind")
    return table


def _grouped(
    modules: dict[str, list], block_groups: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> dict[str, list[str]]:
    """The fused groups present in `modules`: block kind -> (group -> members) applied per block."""
    groups: dict[str, list[str]] = {}
    blocks = {(m["blocks"], m["index"]) for path in modules if (m := BLOCK.match(path))}
    for kind, index in sorted(blocks, key=lambda b: (b[0], int(b[1]))):
        for group, members in block_groups.get(kind, {}).items():
            paths = [f"{kind}.{index}.{member}" for member in members]
            if all(path in modules for path in paths):
                groups[f"{kind}.{index}.{group}"] = paths
            elif any(path in modules for path in paths):
                raise ValueError(f"{kind}.{index} has only some members of {group}")
    return groups


def _naming(
    modules: dict[str, list],
    groups: dict[str, list[str]],
    top: Mapping[str, str],
    blocks: Mapping[str, tuple[str, Mapping[str, str]]],
    *,
    complete: bool = True,
) -> dict[str, str]:
    """A checkpoint naming: groups by their fused name, members of groups absent. A `complete`
    naming must name every module outside its groups; a partial one (XLabs) only some."""
    members = {m for paths in groups.values() for m in paths}
    naming: dict[str, str] = {}
    for path in [*modules, *groups]:
        name = top.get(path)
        match = BLOCK.match(path)
        if name is None and match is not None and match["blocks"] in blocks:
            outer, table = blocks[match["blocks"]]
            if match["rest"] in table:
                name = f"{outer}.{match['index']}.{table[match['rest']]}"
        if name is not None:
            naming[path] = name
        elif complete and path not in members and path not in groups:
            raise ValueError(f"{path!r} has no original name")
    named_members = [m for group in naming if group in groups for m in groups[group] if m in naming]
    if named_members:
        raise ValueError(f"{named_members[0]!r} is named both alone and in its group")
    return naming


def _swap_halves(out_features: int) -> list[list[int]]:
    """Rows of a (shift, scale) layer in (scale, shift) order, or the reverse: the halves swapped."""
    half = out_features // 2
    return [[half, out_features], [0, half]]


def _on_meta(class_name: str, config: Mapping[str, Any]) -> tuple[nn.Module, dict[str, list]]:
    """A diffusers model built on the meta device, and its Linear/Conv2d table (qk-norm scales and
    other norms carry no LoRA in these models, so they are left out)."""
    import diffusers
    import torch

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    return model, {path: entry for path, entry in linear_table(model).items() if entry[0] != "norm"}


def flux_component(config: Mapping[str, Any]) -> dict[str, Any]:
    """The spec of a `FluxTransformer2DModel(**config)`: diffusers paths, groups, the BFL naming."""
    model, modules = _on_meta("FluxTransformer2DModel", config)
    groups = _grouped(
        modules, {"transformer_blocks": FLUX_DOUBLE_GROUPS, "single_transformer_blocks": FLUX_SINGLE_GROUPS}
    )
    naming = _naming(modules, groups, FLUX_TOP, FLUX_BLOCKS)
    xlabs = _naming(
        modules,
        groups,
        {},
        {
            "transformer_blocks": ("double_blocks", XLABS_DOUBLE),
            "single_transformer_blocks": ("single_blocks", XLABS_SINGLE),
        },
        complete=False,
    )
    spec = _denoiser(
        model,
        config,
        modules,
        groups,
        "bfl",
        naming,
        {"norm_out.linear": _swap_halves(modules["norm_out.linear"][2])},
    )
    spec["namings"]["xlabs"] = xlabs
    return spec


def chroma_component(config: Mapping[str, Any]) -> dict[str, Any]:
    """The spec of a `ChromaTransformer2DModel(**config)`: FLUX.1's blocks without their modulation
    layers, plus the distilled guidance approximator; no final adaLN, so no row swap."""
    model, modules = _on_meta("ChromaTransformer2DModel", config)
    groups = _grouped(
        modules, {"transformer_blocks": FLUX_DOUBLE_GROUPS, "single_transformer_blocks": FLUX_SINGLE_GROUPS}
    )
    approximator = "distilled_guidance_layer"
    top = {name: bfl for name, bfl in FLUX_TOP.items() if name in modules}
    top[f"{approximator}.in_proj"] = f"{approximator}.in_proj"
    top[f"{approximator}.out_proj"] = f"{approximator}.out_proj"
    for i in range(model.config.approximator_layers):
        top[f"{approximator}.layers.{i}.linear_1"] = f"{approximator}.layers.{i}.in_layer"
        top[f"{approximator}.layers.{i}.linear_2"] = f"{approximator}.layers.{i}.out_layer"
    naming = _naming(modules, groups, top, FLUX_BLOCKS)
    return _denoiser(model, config, modules, groups, "bfl", naming, {})


def flux2_component(config: Mapping[str, Any]) -> dict[str, Any]:
    """The spec of a `Flux2Transformer2DModel(**config)`: diffusers paths, groups, the BFL naming."""
    model, modules = _on_meta("Flux2Transformer2DModel", config)
    groups = _grouped(modules, {"transformer_blocks": FLUX_DOUBLE_GROUPS})
    blocks = {
        "transformer_blocks": ("double_blocks", FLUX2_DOUBLE),
        "single_transformer_blocks": ("single_blocks", FLUX2_SINGLE),
    }
    naming = _naming(modules, groups, FLUX2_TOP, blocks)
    swaps = {"norm_out.linear": _swap_halves(modules["norm_out.linear"][2])}
    return _denoiser(model, config, modules, groups, "bfl", naming, swaps)


def sd3_component(config: Mapping[str, Any]) -> dict[str, Any]:
    """The spec of an `SD3Transformer2DModel(**config)`: diffusers paths, groups, the MMDiT naming.
    The last joint block is context `pre_only`: its context adaLN has two chunks, (shift, scale) in
    the original order like the final layer's."""
    model, modules = _on_meta("SD3Transformer2DModel", config)
    groups = _grouped(modules, {"transformer_blocks": MMDIT_GROUPS})
    naming = _naming(modules, groups, MMDIT_TOP, {"transformer_blocks": ("joint_blocks", MMDIT_BLOCK)})
    last = f"transformer_blocks.{model.config.num_layers - 1}.norm1_context.linear"
    swaps = {path: _swap_halves(modules[path][2]) for path in ("norm_out.linear", last)}
    return _denoiser(model, config, modules, groups, "mmdit", naming, swaps)


def _denoiser(
    model: nn.Module,
    config: Mapping[str, Any],
    modules: dict[str, list],
    groups: dict[str, list[str]],
    naming_name: str,
    naming: dict[str, str],
    swaps: dict[str, list[list[int]]],
) -> dict[str, Any]:
    return {
        "role": "denoiser",
        "slot": None,
        "class": type(model).__name__,
        "config": _jsonable(config),
        "flat_naming": naming_name,
        "native_naming": naming_name,
        "modules": modules,
        "groups": groups,
        "namings": {naming_name: naming},
        "row_orders": {naming_name: swaps},
    }


def t5_component(config: Mapping[str, Any], *, slot: int, slots: list[int]) -> dict[str, Any]:
    """The spec of a `T5EncoderModel` (T5-XXL's encoder: Flux's and SD3's third text encoder)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**config))
    return {
        "role": "text_encoder",
        "slot": slot,
        "slots": slots,
        "encoder": "t5xxl",
        "class": type(model).__name__,
        "config": _jsonable(config),
        "flat_naming": "canonical",
        "modules": linear_table(model),
    }


def clip(config: Mapping[str, Any], *, with_projection: bool, slot: int, encoder: str) -> dict[str, Any]:
    """A CLIP text encoder spec (see `loraformats_sd.tables.clip_component`) with its encoder name."""
    return {**clip_component(config, with_projection=with_projection, slot=slot), "encoder": encoder}


def family_spec(
    name: str,
    label: str,
    description: str,
    denoiser: tuple[str, Mapping[str, Any]],
    text_encoders: list[dict[str, Any]],
) -> dict[str, Any]:
    """A DiT family: `transformer`, then `text_encoder`, `text_encoder_2`, ..."""
    import diffusers
    import transformers

    kind, config = denoiser
    build = {
        "flux": flux_component,
        "chroma": chroma_component,
        "flux2": flux2_component,
        "sd3": sd3_component,
    }[kind]
    components: dict[str, Any] = {"transformer": build(config)}
    for index, spec in enumerate(text_encoders, start=1):
        components["text_encoder" if index == 1 else f"text_encoder_{index}"] = spec
    return {
        "schema": SCHEMA,
        "family": name,
        "label": label,
        "description": description,
        "generated_by": GENERATOR,
        "generated_with": {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "components": components,
    }
