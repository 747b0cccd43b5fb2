"""LoRA files for the tiny families, and an independent float64 reference of what they do.

Nothing here uses loraformats' adapter maths or name resolution: Kohya names are flattened from
the family's tables directly, ΔW is computed from the raw tensors, and the changes a consumer made
are read off the models it fused. The consumer and round-trip tests compare all three.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tiny import build_pipeline, tiny_family

Key = tuple[str, str]  # (component, canonical module path)

#: The representative UNet modules: attention Linears, feed-forward, proj_in/out, ResNet convs and
#: time_emb_proj, conv_shortcut, down/up samplers (every match in the tiny UNet, not one of each).
UNET_TARGETS = re.compile(
    r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out"
    r"|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$"
)
#: Every CLIP self-attention and MLP module.
TEXT_TARGETS = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
#: 3x3 convs that get a Tucker core when `tucker=True`.
TUCKER_TARGETS = re.compile(r"resnets\.\d+\.conv2$")

#: Scale (alpha / rank) cycles per alpha policy; None = no alpha tensor (alpha = rank).
ALPHA_POLICIES: dict[str, tuple[float | None, ...]] = {
    "mixed": (1.0, 2.0, 0.75, None, 0.5, 1.5, 0.25, 1.25),
    "varied": (1.0, 2.0, 0.75, 0.5, 1.5, 0.25, 1.25),  # "mixed" with an alpha tensor on every module
    "rank": (1.0,),
    "pow2": (2.0, 0.5, 1.0, 0.25, 4.0),
    "nonpow2": (0.75, 1.5, 1.25, 0.375, 3.0),
    "none": (None,),
}

#: PEFT target lists used when diffusers itself trains/saves a LoRA (suffix match, PEFT-style).
PEFT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                     "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]  # fmt: skip
PEFT_TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


# ------------------------------------------------------------------------------------------ names


def kohya_prefix(family: Any, component: Any) -> str:
    """sd-scripts' prefix: lora_unet, lora_te (one text encoder), lora_te1 / lora_te2 (SDXL)."""
    if component.role == "denoiser":
        return "lora_unet"
    encoders = [c for c in family.components.values() if c.role == "text_encoder"]
    return "lora_te" if len(encoders) == 1 else f"lora_te{component.slot}"


def module_name(component: Any, path: str, naming: str) -> str:
    """The dotted module name under `naming` (the UNet's "ldm" table, else the canonical path)."""
    return component.namings[naming][path] if naming in component.namings else path


def kohya_stems(family: Any) -> dict[str, Key]:
    """Every Kohya module stem the family can be written with, in any naming -> (component, path)."""
    stems: dict[str, Key] = {}
    for component in family.components.values():
        prefix = kohya_prefix(family, component)
        for naming in ("canonical", *component.namings):
            for path in component.modules:
                stem = f"{prefix}_{module_name(component, path, naming).replace('.', '_')}"
                assert stems.setdefault(stem, (component.name, path)) == (component.name, path), stem
    return stems


def target_keys(family: Any, components: Iterable[str] | None = None) -> list[Key]:
    """The representative module set, in model order."""
    keys = []
    for component in family.components.values():
        if components is not None and component.name not in components:
            continue
        pattern = UNET_TARGETS if component.role == "denoiser" else TEXT_TARGETS
        keys += [(component.name, p) for p, layer in component.modules.items()
                 if pattern.search(p) and layer.kind in ("linear", "conv2d")]  # fmt: skip
    return keys


# ------------------------------------------------------------------------------------------ Kohya


def make_kohya(
    path: str | Path,
    family_name: str,
    *,
    naming: str = "canonical",
    dtype: torch.dtype = torch.float16,
    rank: int | tuple[int, ...] = 4,
    seed: int = 0,
    tucker: bool = True,
    components: Iterable[str] | None = None,
    alpha: str | float = "mixed",
    metadata: dict[str, str] | None = None,
) -> dict[str, Key]:
    """Write a Kohya LoRA/LoCon file for a tiny family; returns {Kohya module stem: (component, path)}.

    Factors are N(0, 1) (so ΔW is large next to the base weights). `naming` applies to the UNet.
    `rank` may be a tuple, cycled over modules. `alpha` is a policy of `ALPHA_POLICIES` (cycled over
    modules: "mixed" has scale 1, powers of two, non-powers of two and absent alphas) or a number
    used for every module. Alphas are stored in the factor dtype, as sd-scripts saves them.
    Tucker modules: down (r, in, 1, 1), mid (r, r, kh, kw), up (out, r, 1, 1).
    """
    family = tiny_family(family_name)
    generator = torch.Generator().manual_seed(seed)
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    scales = ALPHA_POLICIES[alpha] if isinstance(alpha, str) else None
    tensors: dict[str, torch.Tensor] = {}
    stems: dict[str, Key] = {}
    for index, (component_name, module_path) in enumerate(target_keys(family, components)):
        component = family.components[component_name]
        layer = component.modules[module_path]
        flat = module_name(component, module_path, naming).replace(".", "_")
        stem = f"{kohya_prefix(family, component)}_{flat}"
        r = ranks[index % len(ranks)]

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator).to(dtype)

        if layer.kind == "linear":
            down, up, mid = randn(r, layer.in_features), randn(layer.out_features, r), None
        elif tucker and TUCKER_TARGETS.search(module_path) and layer.kernel != (1, 1):
            down, mid = randn(r, layer.in_features, 1, 1), randn(r, r, *layer.kernel)
            up = randn(layer.out_features, r, 1, 1)
        else:
            down, up, mid = (
                randn(r, layer.in_features, *layer.kernel),
                randn(layer.out_features, r, 1, 1),
                None,
            )
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        if mid is not None:
            tensors[f"{stem}.lora_mid.weight"] = mid
        if scales is None:
            value = float(alpha)
        else:
            scale = scales[index % len(scales)]
            value = None if scale is None else scale * r
        if value is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(value, dtype=dtype)
        stems[stem] = (component_name, module_path)
    save_file(tensors, str(path), metadata=metadata)
    return stems


def reference_deltas(path: str | Path, family: Any) -> dict[Key, torch.Tensor]:
    """ΔW per module of a Kohya file, float64, from the raw tensors: alpha/r · up @ (mid) @ down.

    Alpha absent (or 0, as sd-scripts reads it) means alpha = rank. Tucker:
    ΔW[o, i, :, :] = Σ_{a,b} U[o, a] M[a, b, :, :] D[b, i].
    """
    if isinstance(family, str):
        family = tiny_family(family)
    raw = load_file(str(path))
    stems = kohya_stems(family)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in raw.items():
        stem, _, role = name.partition(".")
        grouped.setdefault(stem, {})[role] = tensor.to(torch.float64)
    deltas: dict[Key, torch.Tensor] = {}
    for stem, roles in grouped.items():
        key = stems[stem]
        assert key not in deltas, f"two modules adapt {key}"
        assert set(roles) <= {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}, roles
        layer = family.components[key[0]].modules[key[1]]
        down, up = roles["lora_down.weight"], roles["lora_up.weight"]
        r = down.shape[0]
        alpha = float(roles["alpha"]) if "alpha" in roles else 0.0
        scale = (alpha or r) / r
        up2 = up.reshape(up.shape[0], -1)  # (out, r)
        if "lora_mid.weight" in roles:
            mid, down2 = roles["lora_mid.weight"], down.reshape(r, -1)  # (r, r, kh, kw), (r, in)
            delta = torch.einsum("oa,abhw,bi->oihw", up2, mid, down2)
        else:
            delta = (up2 @ down.reshape(r, -1)).reshape(
                layer.out_features, layer.in_features, *down.shape[2:]
            )
        shape = (layer.out_features, layer.in_features, *layer.kernel) if layer.kind == "conv2d" else (
            layer.out_features, layer.in_features)  # fmt: skip
        deltas[key] = scale * delta.reshape(shape)
    return deltas


# ------------------------------------------------------------------------------- models and changes


def component_module(pipe: Any, key: Key) -> torch.nn.Module:
    """The base layer of a canonical module in a pipeline (through PEFT wrappers, without `text_model.`)."""
    model = getattr(pipe, key[0])
    path = key[1]
    if path.startswith("text_model.") and not hasattr(model, "text_model"):
        path = path[len("text_model.") :]  # transformers >= 5 flattened CLIPTextModel
    module = model.get_submodule(path)
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def snapshot(pipe: Any, family: Any) -> dict[Key, torch.Tensor]:
    """float64 copies of every Linear / Conv2d weight the family lists (the base for `module_changes`)."""
    return {
        (component.name, path): component_module(pipe, (component.name, path))
        .weight.detach()
        .to(torch.float64)
        for component, path, layer in family.iter_modules()
        if layer.kind in ("linear", "conv2d")
    }


def module_changes(before: dict[Key, torch.Tensor], pipe: Any) -> dict[Key, torch.Tensor]:
    """W' - W in float64 for every snapshotted module (zero tensors where nothing changed)."""
    return {
        key: component_module(pipe, key).weight.detach().to(torch.float64) - w for key, w in before.items()
    }


def changed(changes: dict[Key, torch.Tensor]) -> set[Key]:
    return {key for key, change in changes.items() if bool(change.ne(0).any())}


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    scale = max(float(expected.norm()), float(actual.norm()), 1e-300)
    return float((expected - actual).norm()) / scale


def relative_errors(expected: dict[Key, torch.Tensor], actual: dict[Key, torch.Tensor]) -> dict[Key, float]:
    """Per-module Frobenius relative error over the expected modules (shapes must agree)."""
    errors = {}
    for key, delta in expected.items():
        assert actual[key].shape == delta.shape, (key, actual[key].shape, delta.shape)
        errors[key] = relative_error(delta, actual[key])
    return errors


def worst(errors: dict[Key, float], limit: float) -> list[tuple[Key, float]]:
    """Modules over `limit`, worst first (empty when all pass): a readable assertion message."""
    return sorted(((k, e) for k, e in errors.items() if not e <= limit), key=lambda item: -item[1])[:5]


def count_lora_layers(pipe: Any, adapter_name: str) -> dict[str, int]:
    """PEFT-injected LoRA layers holding `adapter_name`, per pipeline component."""
    from peft.tuners.lora import LoraLayer

    counts = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            counts[name] = sum(
                1 for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A
            )
    return counts


def per_component(keys: Iterable[Key]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for component, _ in keys:
        counts[component] = counts.get(component, 0) + 1
    return counts


# ------------------------------------------------------------------------------- diffusers (PEFT)


def _peft_config(r: int, alpha: float, targets: list[str], patterns: dict | None):
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=targets, **(patterns or {})
    )


#: Per-component rank/alpha patterns for the "patterns" variant (PEFT regexes, matched on suffixes).
PATTERNS = {
    "unet": {"rank_pattern": {"attn1.to_q": 8, "conv_shortcut": 2}, "alpha_pattern": {
        "to_k": 3, "resnets.0.conv1": 5, "ff.net.2": 16, "conv_shortcut": 1}},
    "text_encoder": {"rank_pattern": {"fc1": 2}, "alpha_pattern": {"q_proj": 3, "layers.1.mlp.fc2": 2}},
    "text_encoder_2": {"rank_pattern": {"v_proj": 8}, "alpha_pattern": {"out_proj": 6}},
}  # fmt: skip


def make_diffusers(
    directory: str | Path,
    family_name: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    patterns: bool = False,
    r: int = 4,
    lora_alpha: float = 8,
    components: Iterable[str] | None = None,
) -> tuple[Path, dict[Key, torch.Tensor]]:
    """A LoRA trained-and-saved the diffusers way; returns (file, ΔW per module as PEFT computes it).

    `add_adapter(LoraConfig(...))` on the UNet and every text encoder, every lora_A / lora_B set to
    N(0, 1) values representable in `dtype`, then `save_lora_weights` with the configs as
    `*_lora_adapter_metadata` (state dicts cast to `dtype`). The expected changes are PEFT's own
    `get_delta_weight` on a float64 copy of each adapted layer. `components` limits which models
    get an adapter (default: the UNet and every text encoder).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    family = tiny_family(family_name)
    pipe = build_pipeline(family_name, seed=seed + 1000)
    generator = torch.Generator().manual_seed(seed)
    names = [c.name for c in family.components.values() if components is None or c.name in components]
    layers: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, dict] = {}
    expected: dict[Key, torch.Tensor] = {}
    for name in names:
        model = getattr(pipe, name)
        targets = PEFT_UNET_TARGETS if name == "unet" else PEFT_TEXT_TARGETS
        config = _peft_config(r, lora_alpha, targets, PATTERNS[name] if patterns else None)
        model.add_adapter(config)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    for factor in (module.lora_A["default"], module.lora_B["default"]):
                        values = torch.randn(factor.weight.shape, generator=generator)
                        factor.weight.copy_(values.to(dtype).to(factor.weight.dtype))
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                canonical = path if name == "unet" or path.startswith("text_model.") else f"text_model.{path}"
                double = copy.deepcopy(module).to(torch.float64)
                expected[(name, canonical)] = double.get_delta_weight("default").detach()
        layers[name] = {
            k: v.to(dtype) for k, v in get_peft_model_state_dict(model, adapter_name="default").items()
        }
        configs[name] = config.to_dict()
    directory = Path(directory)
    kwargs: dict[str, Any] = {}
    for name in names:
        kwargs[f"{name}_lora_layers"] = layers[name]
        kwargs[f"{name}_lora_adapter_metadata"] = configs[name]
    type(pipe).save_lora_weights(directory, **kwargs)
    return directory / "pytorch_lora_weights.safetensors", expected


def file_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def adapter_metadata(path: str | Path) -> dict[str, Any]:
    return json.loads(file_metadata(path).get("lora_adapter_metadata", "{}"))
