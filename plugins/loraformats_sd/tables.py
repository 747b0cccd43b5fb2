"""Generators for the Stable Diffusion family specs: module tables read off the real model classes.

Nothing here is a hand-written table. Module geometries come from instantiating the diffusers /
transformers classes on the meta device (no weights, no memory), and the LDM naming is derived
from the UNet config with the same rules as diffusers' own LDM→diffusers checkpoint converter
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`), so tiny test configs get
correct tables too. torch, diffusers and transformers are imported only inside the functions
that build models: importing this module (or calling `ldm_name`) stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

SCHEMA = "loraformats.family/1"
GENERATOR = "scripts/generate_family_specs.py"
TEXT_MODEL = "text_model."

#: UNet2DConditionModel's defaults for the config entries the LDM naming depends on, for configs
#: that leave them out (a saved diffusers config always has them).
UNET_DEFAULTS: dict[str, Any] = {
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}

#: Top-level UNet modules: diffusers path → LDM path (diffusers' DIFFUSERS_TO_LDM_MAPPING["unet"]).
LDM_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
#: SDXL's `add_embedding` and a timestep/projection `class_embedding` both live at `label_emb.0`.
LDM_LABEL_EMB = {"linear_1": "label_emb.0.0", "linear_2": "label_emb.0.2"}
#: ResNet internals: diffusers name → LDM name (`update_unet_resnet_ldm_to_diffusers`, reversed).
LDM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _has_attentions(block_type: str) -> bool:
    return "Attn" in block_type


def _index(text: str, path: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{path!r}: expected a block index, found {text!r}")
    return int(text)


def ldm_name(path: str, unet_config: Mapping[str, Any]) -> str:
    """The LDM/SGM checkpoint module path of a diffusers UNet module path.

    Original checkpoints (and Kohya's SDXL LoRAs) number the UNet as one flat sequence of
    `input_blocks` / `output_blocks`, each a small list (resnet, attention, sampler). The numbering
    depends on `layers_per_block` and on which up blocks have attentions (an up block's upsampler
    sits after its attention, if any), so it is computed from the config, never tabulated.
    """
    config = {**UNET_DEFAULTS, **{k: v for k, v in unet_config.items() if v is not None}}
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError(f"layers_per_block={per_block!r}: the LDM layout needs one int for all blocks")
    stride = per_block + 1  # LDM slots per diffusers block: its resnets, then its sampler
    parts = path.split(".")

    if path in LDM_TOP_LEVEL:
        return LDM_TOP_LEVEL[path]
    if len(parts) == 2 and parts[0] in ("add_embedding", "class_embedding") and parts[1] in LDM_LABEL_EMB:
        return LDM_LABEL_EMB[parts[1]]
    if path == "class_embedding":  # an nn.Embedding of `num_class_embeds` classes
        return "label_emb"

    if parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 4:
        down = parts[0] == "down_blocks"
        types = config["down_block_types" if down else "up_block_types"]
        block, kind, layer, rest = _index(parts[1], path), parts[2], _index(parts[3], path), parts[4:]
        if block >= len(types):
            raise ValueError(f"{path!r}: the config has {len(types)} {parts[0]}")
        layers = per_block if down else per_block + 1  # up blocks have one more resnet
        base = 1 + block * stride if down else block * stride  # input_blocks.0 is conv_in
        outer = "input_blocks" if down else "output_blocks"
        sampler = "downsamplers" if down else "upsamplers"
        if kind == "resnets" and layer < layers and rest and rest[0] in LDM_RESNET:
            return ".".join([outer, str(base + layer), "0", LDM_RESNET[rest[0]], *rest[1:]])
        if kind == "attentions" and layer < layers and _has_attentions(types[block]):
            return ".".join([outer, str(base + layer), "1", *rest])
        if kind == sampler and layer == 0 and rest == ["conv"] and block < len(types) - 1:  # not the last
            if down:
                return f"input_blocks.{base + per_block}.0.op"
            # An up block ends with [resnet, attention?, upsampler] in one output block.
            position = 2 if _has_attentions(types[block]) else 1
            return f"output_blocks.{base + per_block}.{position}.conv"

    if parts[0] == "mid_block" and len(parts) >= 3 and _has_attentions(config["mid_block_type"]):
        # LDM's middle_block is [resnet, attention, resnet, ...]: resnets at even, attentions at odd.
        kind, layer, rest = parts[1], _index(parts[2], path), parts[3:]
        if kind == "resnets" and rest and rest[0] in LDM_RESNET:
            return ".".join(["middle_block", str(2 * layer), LDM_RESNET[rest[0]], *rest[1:]])
        if kind == "attentions":
            return ".".join(["middle_block", str(2 * layer + 1), *rest])

    raise ValueError(f"{path!r} has no LDM equivalent under this UNet config")


def ldm_naming(paths: Iterable[str], unet_config: Mapping[str, Any]) -> dict[str, str]:
    """The "ldm" naming table for these diffusers module paths; refuses two paths on one name."""
    naming: dict[str, str] = {}
    owners: dict[str, str] = {}
    for path in paths:
        name = ldm_name(path, unet_config)
        if name in owners:
            raise ValueError(f"{owners[name]!r} and {path!r} both map to LDM {name!r}")
        owners[name] = path
        naming[path] = name
    return naming


def layer_entry(module: nn.Module) -> list | None:
    """The spec entry of a module a LoRA may target, or None for modules without a base layer."""
    from torch import nn

    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped conv {module!r}: a spec entry cannot describe its weight")
        return ["conv2d", module.in_channels, module.out_channels, list(module.kernel_size)]
    if isinstance(module, nn.Linear):
        return ["linear", module.in_features, module.out_features]
    if isinstance(module, nn.GroupNorm):
        return ["norm", module.num_channels, module.num_channels]
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise ValueError(f"LayerNorm over {module.normalized_shape}: a spec entry needs one dimension")
        return ["norm", module.normalized_shape[0], module.normalized_shape[0]]
    return None


def module_table(model: nn.Module, rename: Callable[[str], str] = str) -> dict[str, list]:
    """Every Linear, Conv2d, GroupNorm and LayerNorm in model order, under `rename(path)`.

    Any other module holding parameters (except embeddings, which LoRAs here never target) is
    an error: a new layer type in a future library version must not vanish from the tables.
    """
    from torch import nn

    table: dict[str, list] = {}
    for path, module in model.named_modules():
        entry = layer_entry(module)
        if entry is not None:
            name = rename(path)
            if name in table:
                raise ValueError(f"two modules are named {name!r}")
            table[name] = entry
        elif any(True for _ in module.parameters(recurse=False)) and not isinstance(module, nn.Embedding):
            raise ValueError(f"{path!r} ({type(module).__name__}) holds parameters but has no spec kind")
    return table


def _jsonable(value: Any) -> Any:
    """Config values as JSON has them (tuples become lists), so a reloaded spec compares equal."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"config value {value!r} is not JSON data")


def unet_component(config: Mapping[str, Any], *, flat_naming: str) -> dict[str, Any]:
    """The spec of a `UNet2DConditionModel(**config)`: diffusers paths, plus the "ldm" naming."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    modules = module_table(model)
    namings = {"ldm": ldm_naming(modules, dict(model.config))}
    if flat_naming != "canonical" and flat_naming not in namings:
        raise ValueError(f"unknown flat naming {flat_naming!r}")
    return {
        "role": "denoiser",
        "slot": None,
        "class": type(model).__name__,
        "config": _jsonable(config),
        "flat_naming": flat_naming,
        "native_naming": "ldm",
        "modules": modules,
        "namings": namings,
    }


def checkpoint_path(path: str) -> str:
    """A CLIP module path as checkpoints (and Kohya) spell it: inside `text_model.`.

    transformers >= 5 dropped the `text_model` wrapper from `CLIPTextModel` (not from
    `CLIPTextModelWithProjection`), so the same layer would otherwise get two names.
    """
    if path == "text_projection" or path.startswith(TEXT_MODEL):
        return path
    return TEXT_MODEL + path


def clip_component(
    config: Mapping[str, Any], *, with_projection: bool, slot: int, encoder: str | None = None
) -> dict[str, Any]:
    """The spec of a CLIP text encoder (`CLIPTextModel`, or `...WithProjection` for SDXL's second)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        model = model_class(CLIPTextConfig(**config))
    modules = module_table(model, checkpoint_path)
    spec = {
        "role": "text_encoder",
        "slot": slot,
        **({"encoder": encoder} if encoder else {}),
        "class": model_class.__name__,
        "config": _jsonable(config),
        "flat_naming": "canonical",
        "path_aliases": [TEXT_MODEL],
        "modules": modules,
    }
    # How this transformers version's class names its modules, where that differs from checkpoints:
    # PEFT adapters are keyed by these runtime names and do not map the checkpoint spelling.
    runtime = {checkpoint_path(name): name for name in module_table(model)}
    if any(canonical != name for canonical, name in runtime.items()):
        spec["namings"] = {"module": {path: runtime[path] for path in modules}}
    return spec


def family_spec(
    name: str,
    label: str,
    description: str,
    unet_config: Mapping[str, Any],
    text_encoder_configs: list[tuple[Mapping[str, Any], bool, str]],
    unet_flat_naming: str,
) -> dict[str, Any]:
    """A whole family spec: `unet`, then `text_encoder`, `text_encoder_2`, ... (slots 1, 2, ...)."""
    import diffusers
    import transformers

    components: dict[str, Any] = {"unet": unet_component(unet_config, flat_naming=unet_flat_naming)}
    for slot, (config, with_projection, encoder) in enumerate(text_encoder_configs, start=1):
        key = "text_encoder" if slot == 1 else f"text_encoder_{slot}"
        components[key] = clip_component(config, with_projection=with_projection, slot=slot, encoder=encoder)
    return {
        "schema": SCHEMA,
        "family": name,
        "label": label,
        "description": description,
        "generated_by": GENERATOR,
        "generated_with": {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "components": components,
    }


def spec_json(spec: Mapping[str, Any]) -> str:
    """A spec as file text: objects one entry per line, lists on one line, so each module is one
    line of a diff. Key order is kept (model order for modules), so the output is deterministic."""

    def render(value: Any, indent: str) -> str:
        if isinstance(value, Mapping) and value:
            inner = indent + "  "
            items = (f"{inner}{json.dumps(key)}: {render(item, inner)}" for key, item in value.items())
            return "{\n" + ",\n".join(items) + "\n" + indent + "}"
        return json.dumps(value, ensure_ascii=False)

    return render(spec, "") + "\n"
