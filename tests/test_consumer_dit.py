"""DiT LoRAs (FLUX.1, SD3) converted by loraformats make the same changes in real diffusers pipelines.

Sources are written from the family tables alone: Kohya / ComfyUI files in the original (BFL, MMDiT)
naming, with fused groups (`img_attn.qkv`, `linear1`, SD3's `attn.qkv` / `attn2.qkv`) and the
shift/scale-swapped rows (`final_layer.adaLN_modulation.1`, SD3's last `context_block.adaLN_modulation.1`),
and diffusers files saved by diffusers itself from PEFT adapters. Every factor is N(0, 1) from a seeded
generator. A consumer's change per module, W' - W in float64 (fused fp32 model minus a float64 snapshot),
is compared with a float64 reference computed from the raw source tensors: (alpha / r) · up @ down of
the fused module, rows put back in canonical order, cut into its members. The set of changed modules
must be exactly the set the source adapts (loaders skip names they do not know without a word).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loraformats
from loraformats.cli import main
from loraformats.plugins import registry
from tiny import build_dit_pipeline, tiny_dit_family

Key = tuple[str, str]  # (component, canonical module path)

FP32_LIMIT = 1e-6  # per-module relative Frobenius error, fp32 pipeline against the float64 reference

#: CLIP attention/MLP and T5 attention/feed-forward Linears.
TEXT_TARGETS = re.compile(
    r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]|SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wo))$"
)
#: (rank, alpha) cycled over modules: scales 1, 2, 0.75, 0.5, 1.5, none (= 1), 0.25, 1.25, 3.
SHAPES: tuple[tuple[int, float | None], ...] = (
    (4, 4.0), (2, 4.0), (8, 6.0), (4, 2.0), (2, 3.0), (4, None), (8, 2.0), (4, 5.0), (2, 6.0),
)  # fmt: skip

#: PEFT (suffix-matched) targets of the diffusers-saved Flux sources: every Linear of the transformer.
PEFT_FLUX_TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "proj_mlp",
    "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "ff.net.0.proj",
    "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "x_embedder", "context_embedder",
    "linear_1", "linear_2",
]  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # the tiny pipelines' scheduler config


def needs_format(name: str) -> None:
    """Skip the calling test while the `name` format is not installed."""
    if name not in registry.formats():
        pytest.skip(f"the {name!r} format is not installed yet")


@pytest.fixture(autouse=True)
def quiet_lora_loading():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------ names


def original_naming(component: Any) -> str:
    """The naming Kohya and ComfyUI files use: BFL / MMDiT for the transformer, paths for encoders."""
    return component.native_naming if component.role == "denoiser" else "canonical"


def kohya_stem(component: Any, path: str) -> str:
    """sd-scripts' name: `lora_unet_` + flattened original name, `lora_te<slot>_` + flattened path."""
    prefix = "lora_unet" if component.role == "denoiser" else f"lora_te{component.slots[0]}"
    return f"{prefix}_{component.name_in(path, original_naming(component)).replace('.', '_')}"


def comfyui_stem(component: Any, path: str) -> str:
    """ComfyUI's name: `diffusion_model.` + original name, `text_encoders.<encoder>.transformer.` + path."""
    name = component.name_in(path, original_naming(component))
    if component.role == "denoiser":
        return f"diffusion_model.{name}"
    return f"text_encoders.{component.encoder}.transformer.{name}"


STYLES: dict[str, Callable[[Any, str], str]] = {"kohya": kohya_stem, "comfyui": comfyui_stem}


def original_stems(family: Any) -> dict[str, Key]:
    """Every Kohya and ComfyUI module stem of the family -> (component, path of the named module)."""
    stems: dict[str, Key] = {}
    for component in family.components.values():
        for path in component.named_paths(original_naming(component)):
            for style in STYLES.values():
                stems[style(component, path)] = (component.name, path)
    return stems


# ------------------------------------------------------------------------------------------ sources


def make_original(
    path: Path,
    family_name: str,
    *,
    style: str = "kohya",
    components: Iterable[str] = ("transformer", "text_encoder"),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    select: Callable[[str], bool] | None = None,
    overrides: dict[str, tuple[int, float | None]] | None = None,
) -> dict[str, Key]:
    """Write a Kohya (`style="kohya"`) or ComfyUI LoRA in the original naming: every Linear/Conv2d the
    naming names (fused groups, not their members) and the CLIP/T5 attention and MLP modules of
    `components`, N(0, 1) factors in `dtype`, (rank, alpha) cycled from `SHAPES` (alpha in `dtype`, as
    sd-scripts stores it; None = no alpha tensor), or from `overrides` by path. `select(path)` filters
    the transformer's modules. Returns {stem: key}.
    """
    family = tiny_dit_family(family_name)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    stems: dict[str, Key] = {}
    index = 0
    for component_name in components:
        component = family.components[component_name]
        for module in component.named_paths(original_naming(component)):
            layer = component.modules[module]
            if layer.kind not in ("linear", "conv2d"):
                continue
            if component.role == "text_encoder" and not TEXT_TARGETS.search(module):
                continue
            if select is not None and component.role == "denoiser" and not select(module):
                continue
            rank, alpha = (overrides or {}).get(module, SHAPES[index % len(SHAPES)])
            index += 1
            conv = layer.kind == "conv2d"
            down = torch.randn(rank, layer.in_features, *(layer.kernel if conv else ()), generator=generator)
            up = torch.randn(layer.out_features, rank, *((1, 1) if conv else ()), generator=generator)
            stem = STYLES[style](component, module)
            tensors[f"{stem}.lora_down.weight"] = down.to(dtype)
            tensors[f"{stem}.lora_up.weight"] = up.to(dtype)
            if alpha is not None:
                tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=dtype)
            stems[stem] = (component_name, module)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_flux"})
    return stems


def canonical_rows(component: Any, path: str, naming: str, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """A named module's ΔW as its canonical members' ΔW: the naming's row order undone, then the rows
    cut into the group's members (in group order, widths from the table)."""
    order = component.row_order(path, naming)
    if order is not None:  # the naming's rows are canonical[start:stop] for each range, in order
        rows, at = torch.empty_like(delta), 0
        for start, stop in order:
            rows[start:stop] = delta[at : at + stop - start]
            at += stop - start
        assert at == delta.shape[0]
        delta = rows
    members = component.groups.get(path, (path,))
    widths = [component.modules[m].out_features for m in members]
    assert sum(widths) == delta.shape[0], (path, widths, delta.shape)
    return dict(zip(members, torch.split(delta, widths), strict=True))


def named_deltas(path: Path, family_name: str) -> dict[Key, torch.Tensor]:
    """ΔW per *named* module (fused groups whole, rows in the file's order) of a Kohya / ComfyUI file,
    float64 from the raw tensors: (alpha / r) · up @ down, alpha absent = r."""
    family = tiny_dit_family(family_name)
    stems = original_stems(family)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(path)).items():
        stem, role = next(
            (name[: -len(suffix)], suffix)
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")
            if name.endswith(suffix)
        )
        grouped.setdefault(stem, {})[role] = tensor.to(torch.float64)
    deltas: dict[Key, torch.Tensor] = {}
    for stem, roles in grouped.items():
        key = stems[stem]
        assert key not in deltas, f"two modules adapt {key}"
        layer = family.components[key[0]].modules[key[1]]
        down, up = roles[".lora_down.weight"], roles[".lora_up.weight"]
        rank = down.shape[0]
        scale = float(roles[".alpha"]) / rank if ".alpha" in roles else 1.0
        delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        deltas[key] = scale * delta.reshape(layer.weight_shape)
    return deltas


def reference_deltas(path: Path, family_name: str) -> dict[Key, torch.Tensor]:
    """ΔW per canonical module of a Kohya / ComfyUI file (see `named_deltas`, `canonical_rows`)."""
    family = tiny_dit_family(family_name)
    deltas: dict[Key, torch.Tensor] = {}
    for (component_name, module), delta in named_deltas(path, family_name).items():
        component = family.components[component_name]
        for member, rows in canonical_rows(component, module, original_naming(component), delta).items():
            assert (component_name, member) not in deltas, member
            deltas[(component_name, member)] = rows
    return deltas


def make_peft_flux(
    directory: Path,
    *,
    seed: int = 0,
    r: int = 4,
    lora_alpha: float = 8,
    targets: list[str] | str = PEFT_FLUX_TARGETS,
    dtype: torch.dtype = torch.float32,
    text_encoder: bool = False,
    family_name: str = "tiny-flux",
    **patterns: Any,
) -> Path:
    """A Flux (or SD3) LoRA trained-and-saved the diffusers way: `add_adapter(LoraConfig(...))` on the
    tiny transformer (and CLIP), every lora_A / lora_B randomised N(0, 1) (PEFT zeroes B), saved by
    the pipeline's `save_lora_weights` with the configs as adapter metadata."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build_dit_pipeline(family_name, seed=seed + 1000)
    generator = torch.Generator().manual_seed(seed)
    models = {"transformer": LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, **patterns)}
    if text_encoder:  # with out_proj: diffusers' Kohya CLIP path tells its key style by `to_out_lora` only
        clip_targets = ["q_proj", "v_proj", "out_proj", "fc2"]
        models["text_encoder"] = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=clip_targets)
    kwargs: dict[str, Any] = {}
    for name, config in models.items():
        model = getattr(pipe, name)
        model.add_adapter(config)
        with torch.no_grad():
            for parameter_name, parameter in sorted(model.named_parameters()):
                if ".lora_A." in parameter_name or ".lora_B." in parameter_name:
                    values = torch.randn(parameter.shape, generator=generator)
                    parameter.copy_(values.to(dtype).to(parameter.dtype))
        state = get_peft_model_state_dict(model)
        kwargs[f"{name}_lora_layers"] = {k: v.to(dtype) for k, v in state.items()}
        kwargs[f"{name}_lora_adapter_metadata"] = config.to_dict()
    type(pipe).save_lora_weights(directory, **kwargs)
    return directory / "pytorch_lora_weights.safetensors"


def diffusers_deltas(path: Path) -> dict[Key, torch.Tensor]:
    """ΔW per module of a diffusers file with uniform r / lora_alpha metadata, float64 from the raw
    tensors: (lora_alpha / r) · B @ A (keys `<component>.<path>.lora_A.weight`)."""
    with safe_open(str(path), "pt") as handle:
        config = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    raw = load_file(str(path))
    deltas = {}
    for name, down in raw.items():
        if not name.endswith(".lora_A.weight"):
            continue
        stem = name.removesuffix(".lora_A.weight")
        component, _, module = stem.partition(".")
        assert not config.get(f"{component}.rank_pattern") and not config.get(f"{component}.alpha_pattern")
        scale = config[f"{component}.lora_alpha"] / config[f"{component}.r"]
        up = raw[f"{stem}.lora_B.weight"].to(torch.float64)
        deltas[(component, module)] = scale * (up @ down.to(torch.float64))
    return deltas


# ------------------------------------------------------------------------------- models and changes


def component_module(pipe: Any, key: Key) -> torch.nn.Module:
    """The base layer of a canonical module (transformers >= 5 `CLIPTextModel` has no `text_model.`)."""
    model, path = getattr(pipe, key[0]), key[1]
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = model.get_submodule(path.removeprefix("text_model."))
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def snapshot(pipe: Any, family: Any, components: Iterable[str]) -> dict[Key, torch.Tensor]:
    """float64 copies of every Linear / Conv2d weight of `components` the family lists (no group paths)."""
    before = {}
    for name in components:
        component = family.components[name]
        for path in component.named_paths("canonical"):
            if component.modules[path].kind in ("linear", "conv2d"):
                weight = component_module(pipe, (name, path)).weight
                before[(name, path)] = weight.detach().to(torch.float64).clone()
    return before


def module_changes(before: dict[Key, torch.Tensor], pipe: Any) -> dict[Key, torch.Tensor]:
    return {
        key: component_module(pipe, key).weight.detach().to(torch.float64) - w for key, w in before.items()
    }


def changed(changes: dict[Key, torch.Tensor]) -> set[Key]:
    return {key for key, change in changes.items() if bool(change.ne(0).any())}


def lora_layers(pipe: Any, components: Iterable[str], adapter: str) -> dict[str, int]:
    """PEFT LoRA layers holding `adapter`, per pipeline component."""
    from peft.tuners.lora import LoraLayer

    return {
        name: sum(
            1 for m in getattr(pipe, name).modules() if isinstance(m, LoraLayer) and adapter in m.lora_A
        )
        for name in components
    }


def apply_in_diffusers(
    family_name: str, lora: Path, components: Iterable[str], adapter: str = "a"
) -> tuple[dict[Key, torch.Tensor], dict[str, int]]:
    """`load_lora_weights` + `fuse_lora(components, lora_scale=1)` in a fresh tiny pipeline: (W' - W of
    every module of every model, T5 included, LoRA layers per fused component)."""
    components = list(components)
    pipe = build_dit_pipeline(family_name)
    family = tiny_dit_family(family_name)
    before = snapshot(pipe, family, family.components)
    pipe.load_lora_weights(str(lora), adapter_name=adapter)
    counts = lora_layers(pipe, components, adapter)
    pipe.fuse_lora(components=components, lora_scale=1.0)
    return module_changes(before, pipe), counts


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    assert expected.shape == actual.shape, (expected.shape, actual.shape)
    scale = max(float(expected.norm()), float(actual.norm()), 1e-300)
    return float((expected - actual).norm()) / scale


def worst(expected: dict[Key, torch.Tensor], actual: dict[Key, torch.Tensor], limit: float = FP32_LIMIT):
    """Modules of `expected` whose `actual` is off by more than `limit` (empty when all pass), worst first."""
    errors = [(key, relative_error(delta, actual[key])) for key, delta in expected.items()]
    return sorted(((k, e) for k, e in errors if not e <= limit), key=lambda item: -item[1])[:5]


def assert_same_changes(expected: dict[Key, torch.Tensor], changes: dict[Key, torch.Tensor]) -> None:
    assert changed(changes) == set(expected), "the modules changed are not exactly the source's modules"
    assert not worst(expected, changes)


def per_component(keys: Iterable[Key], components: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(components, 0)
    for component, _ in keys:
        counts[component] += 1
    return counts


def same_tensors(a: Path, b: Path) -> None:
    """The two files hold the same tensor names, and per name the same dtype, shape and values."""
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        other = second[name]
        assert (tensor.dtype, tensor.shape) == (other.dtype, other.shape), name
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), other.reshape(-1).view(torch.uint8)), name


def diffusers_kohya_reads(path: str) -> bool:
    """Whether diffusers 0.42.1's Kohya Flux converter loads the tiny transformer's module at `path`. It
    names the embedders (`img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`) and the final layer
    without the `transformer.` prefix, so the pipeline drops them without a word, and it cuts `linear1`
    at FLUX.1's hard-coded widths (3072, 3072, 3072, 12288), an assertion on a tiny model."""
    name = tiny_dit_family("tiny-flux").components["transformer"].name_in(path, "bfl")
    return name.startswith("double_blocks.") or (name.startswith("single_blocks.") and ".linear1" not in name)


def kohya_loader_readable(source: Path, output: Path) -> None:
    """Copy a Kohya / ComfyUI Flux file without the transformer modules `diffusers_kohya_reads` rejects."""
    stems = original_stems(tiny_dit_family("tiny-flux"))
    kept = {}
    for name, tensor in load_file(str(source)).items():
        component, path = stems[name.rsplit(".lora_", 1)[0].removesuffix(".alpha")]
        if component != "transformer" or diffusers_kohya_reads(path):
            kept[name] = tensor
    save_file(kept, str(output))


# ------------------------------------------------------------------------------------------ tests

F32, BF16 = torch.float32, torch.bfloat16
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16")]
FLUX_COMPONENTS = ("transformer", "text_encoder")
SD3_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kohya_flux_converted_to_diffusers_changes_every_module_as_the_source(tmp_path, dtype):
    """BFL-named Kohya Flux (fused qkv / linear1, swapped final adaLN, CLIP) -> diffusers -> fused in
    a FluxPipeline: every canonical module changes by its slice of the fused ΔW, nothing else changes."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    stems = make_original(source, "tiny-flux", dtype=dtype, seed=1)
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
            "lora_unet_single_blocks_1_linear1", "lora_unet_final_layer_adaLN_modulation_1",
            "lora_te1_text_model_encoder_layers_1_self_attn_q_proj"} <= set(stems)  # fmt: skip
    report = loraformats.convert(source, "diffusers", output, family="tiny-flux")
    expected = reference_deltas(source, "tiny-flux")

    changes, counts = apply_in_diffusers("tiny-flux", output, FLUX_COMPONENTS)

    assert report.modules == len(stems)
    assert {tensor.dtype for tensor in load_file(str(output)).values()} == {dtype}  # factors not recast
    assert counts == per_component(expected, FLUX_COMPONENTS)
    assert_same_changes(expected, changes)


@pytest.mark.parametrize(
    ("family_name", "components"),
    [
        pytest.param("tiny-flux", FLUX_COMPONENTS, id="flux"),
        pytest.param("tiny-sd3", SD3_COMPONENTS, id="sd3"),
    ],
)
def test_comfyui_converted_to_diffusers_changes_every_module_as_the_source(tmp_path, family_name, components):
    """ComfyUI's layout (`diffusion_model.` + original names, `text_encoders.<encoder>.transformer.`)
    -> diffusers -> fused in the pipeline: the same per-module change as the source by definition."""
    needs_format("comfyui")
    source, output = tmp_path / "comfyui.safetensors", tmp_path / "diffusers.safetensors"
    stems = make_original(source, family_name, style="comfyui", components=components, dtype=BF16, seed=7)
    assert any(stem.startswith("diffusion_model.") for stem in stems)
    assert any(stem.startswith("text_encoders.clip_l.transformer.") for stem in stems)
    report = loraformats.convert(source, "diffusers", output, family=family_name)
    assert report.source_format == "comfyui"
    expected = reference_deltas(source, family_name)

    changes, counts = apply_in_diffusers(family_name, output, components)

    assert counts == per_component(expected, components)
    assert_same_changes(expected, changes)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kohya_sd3_converted_to_diffusers_changes_every_module_as_the_source(tmp_path, dtype):
    """MMDiT-named Kohya SD3 (fused attn/attn2/context qkv, conv patch embedding, swapped final and last
    context adaLN, CLIP-L, CLIP-G and T5, the T5 dropped) -> diffusers -> StableDiffusion3Pipeline."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    stems = make_original(
        source, "tiny-sd3", components=(*SD3_COMPONENTS, "text_encoder_3"), dtype=dtype, seed=2
    )
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn2_qkv",
            "lora_unet_joint_blocks_2_context_block_attn_qkv", "lora_unet_x_embedder_proj",
            "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q"} <= set(stems)  # fmt: skip
    report = loraformats.convert(source, "diffusers", output, family="tiny-sd3", drop=["text_encoder_3"])
    expected = {k: v for k, v in reference_deltas(source, "tiny-sd3").items() if k[0] != "text_encoder_3"}
    assert [step.modules for step in report.steps if step.stage == "drop"] == [
        sum(1 for key in stems.values() if key[0] == "text_encoder_3")
    ]

    changes, counts = apply_in_diffusers("tiny-sd3", output, SD3_COMPONENTS)

    assert counts == per_component(expected, SD3_COMPONENTS)
    assert_same_changes(expected, changes)


def test_diffusers_own_kohya_flux_converter_agrees_with_ours(tmp_path):
    """diffusers' `_convert_kohya_flux_lora_to_diffusers` (load_lora_weights on the Kohya file) and our
    converted file change every module alike, and both match the float64 reference.

    Only the modules diffusers' converter can load from a tiny model (`diffusers_kohya_reads`: double
    blocks, single-block linear2 / modulation, CLIP); fp32 factors, as diffusers multiplies the scale
    into the factors in their own dtype (bf16 would round non-power-of-two scales).
    """
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    make_original(source, "tiny-flux", seed=3, select=diffusers_kohya_reads)
    loraformats.convert(source, "diffusers", output, family="tiny-flux")
    expected = reference_deltas(source, "tiny-flux")

    theirs, their_counts = apply_in_diffusers("tiny-flux", source, FLUX_COMPONENTS, adapter="kohya")
    ours, our_counts = apply_in_diffusers("tiny-flux", output, FLUX_COMPONENTS)

    assert our_counts == their_counts == per_component(expected, FLUX_COMPONENTS)
    assert changed(theirs) == changed(ours) == set(expected)
    assert not worst({key: theirs[key] for key in expected}, ours)
    assert not worst(expected, theirs)


#: diffusers-saved Flux sources: (lora_alpha, PEFT rank/alpha patterns, with a CLIP adapter).
PEFT_VARIANTS = [
    pytest.param(8, {}, False, id="r4-alpha8"),
    pytest.param(6, {}, True, id="r4-alpha6-clip"),
    pytest.param(
        6, {"rank_pattern": {"to_k": 2, "proj_mlp": 8}, "alpha_pattern": {"to_v": 3}}, False, id="patterns"
    ),
]


def file_stems(path: Path) -> set[str]:
    """The module stems of a Kohya / ComfyUI file (tensor names without factor suffixes)."""
    return {name.rsplit(".lora_", 1)[0].removesuffix(".alpha") for name in load_file(str(path))}


@pytest.mark.parametrize("target", ["kohya", "comfyui"])
@pytest.mark.parametrize(("lora_alpha", "patterns", "clip"), PEFT_VARIANTS)
def test_diffusers_saved_flux_lora_converted_to_original_names_changes_every_module_alike(
    tmp_path, lora_alpha, patterns, clip, target
):
    """A LoRA diffusers itself saved from PEFT adapters -> Kohya / ComfyUI (BFL names, fused qkv and
    linear1, swapped final adaLN): the output's own ΔW (float64 from its raw tensors) and diffusers'
    Kohya Flux loader on it both give the change diffusers makes when it loads the original file."""
    needs_format(target)
    source = make_peft_flux(tmp_path / "peft", lora_alpha=lora_alpha, text_encoder=clip, seed=4, **patterns)
    output = tmp_path / f"{target}.safetensors"
    components = FLUX_COMPONENTS if clip else ("transformer",)
    expected_all, counts = apply_in_diffusers("tiny-flux", source, components)
    expected = {key: delta for key, delta in expected_all.items() if key in changed(expected_all)}
    adapted = sum(name.endswith(".lora_A.weight") for name in load_file(str(source)))
    assert len(expected) == sum(counts.values()) == adapted

    report = loraformats.convert(source, target, output, family="tiny-flux")

    transformer = tiny_dit_family("tiny-flux").components["transformer"]
    fused = ("transformer_blocks.0.attn.to_qkv", "transformer_blocks.1.attn.to_added_qkv",
             "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "norm_out.linear")  # fmt: skip
    stems = file_stems(output)
    assert {STYLES[target](transformer, path) for path in fused} <= stems
    assert not any(re.search(r"to_q|to_k|to_v|add_._proj|proj_mlp", stem) for stem in stems), stems
    assert report.modules == len(expected)
    reference = reference_deltas(output, "tiny-flux")
    assert set(reference) == set(expected)
    assert not worst(expected, reference)

    readable = tmp_path / "readable.safetensors"
    kohya_loader_readable(output, readable)
    theirs, their_counts = apply_in_diffusers("tiny-flux", readable, components)
    subset = {key: expected[key] for key in reference_deltas(readable, "tiny-flux")}
    assert their_counts == per_component(subset, components)
    assert_same_changes(subset, theirs)


#: PEFT (suffix-matched) targets of the diffusers-saved SD3 sources: every Linear of the transformer.
PEFT_SD3_TARGETS = [
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "norm1.linear", "norm1_context.linear", "norm_out.linear", "ff.net.0.proj", "ff.net.2",
    "ff_context.net.0.proj", "ff_context.net.2", "proj_out", "context_embedder", "linear_1", "linear_2",
]  # fmt: skip


@pytest.mark.parametrize("target", ["kohya", "comfyui"])
def test_diffusers_saved_sd3_lora_converted_to_original_names_changes_every_module_alike(tmp_path, target):
    """An SD3 LoRA diffusers saved from PEFT adapters (attn2 included) -> Kohya / ComfyUI (MMDiT names,
    fused qkv, both adaLN swaps): the output's own ΔW (float64 from its raw tensors) is the change
    diffusers makes when it loads the original file."""
    needs_format(target)
    source = make_peft_flux(
        tmp_path / "peft", lora_alpha=6, targets=PEFT_SD3_TARGETS, family_name="tiny-sd3", seed=9
    )
    output = tmp_path / f"{target}.safetensors"
    expected_all, counts = apply_in_diffusers("tiny-sd3", source, ("transformer",))
    expected = {key: delta for key, delta in expected_all.items() if key in changed(expected_all)}
    assert (
        len(expected) == sum(counts.values()) == sum(n.endswith(".lora_A.weight") for n in load_file(source))
    )

    loraformats.convert(source, target, output, family="tiny-sd3")

    transformer = tiny_dit_family("tiny-sd3").components["transformer"]
    fused = ("transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn2.to_qkv",
             "transformer_blocks.1.attn.to_added_qkv", "norm_out.linear")  # fmt: skip
    stems = file_stems(output)
    assert {STYLES[target](transformer, path) for path in fused} <= stems
    assert not any(re.search(r"to_q|to_k|to_v|add_._proj", stem) for stem in stems), stems
    reference = reference_deltas(output, "tiny-sd3")
    assert set(reference) == set(expected)
    assert not worst(expected, reference)


ROUND_TRIP_FAMILIES = [
    pytest.param("tiny-flux", FLUX_COMPONENTS, None, id="flux"),
    pytest.param("tiny-sd3", SD3_COMPONENTS, None, id="sd3"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("family_name", "components", "select"), ROUND_TRIP_FAMILIES)
def test_kohya_to_diffusers_to_kohya_gives_back_the_same_tensors(
    tmp_path, family_name, components, select, dtype
):
    """Fused groups split (shared down) and fused back at the same rank, swapped rows swapped back, alphas
    (some absent) restored: the same names, dtypes, shapes and bytes."""
    source, middle, back = (tmp_path / f"{n}.safetensors" for n in ("kohya", "diffusers", "back"))
    make_original(source, family_name, components=components, dtype=dtype, seed=5, select=select)
    loraformats.convert(source, "diffusers", middle, family=family_name)
    loraformats.convert(middle, "kohya", back, family=family_name)
    same_tensors(source, back)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("family_name", "components", "select"), ROUND_TRIP_FAMILIES)
def test_comfyui_to_diffusers_to_comfyui_gives_back_the_same_tensors(
    tmp_path, family_name, components, select, dtype
):
    """ComfyUI (`diffusion_model.` + BFL / MMDiT names, `text_encoders.<encoder>.transformer.`) ->
    diffusers -> ComfyUI: the same names, dtypes, shapes and bytes."""
    needs_format("comfyui")
    source, middle, back = (tmp_path / f"{n}.safetensors" for n in ("comfyui", "diffusers", "back"))
    make_original(
        source, family_name, style="comfyui", components=components, dtype=dtype, seed=6, select=select
    )
    loraformats.convert(source, "diffusers", middle, family=family_name)
    loraformats.convert(middle, "comfyui", back, family=family_name)
    same_tensors(source, back)


@pytest.mark.parametrize(("lora_alpha", "patterns", "clip"), PEFT_VARIANTS)
def test_diffusers_saved_flux_lora_through_kohya_and_back_changes_every_module_alike(
    tmp_path, lora_alpha, patterns, clip
):
    """diffusers (members with their own downs, ranks and alphas) -> Kohya -> diffusers: each group is
    fused block-diagonally at the summed rank, every member's rows using its own columns only, and the
    file that comes back changes every module as the source does in diffusers."""
    source = make_peft_flux(tmp_path / "peft", lora_alpha=lora_alpha, text_encoder=clip, seed=7, **patterns)
    kohya, back = tmp_path / "kohya.safetensors", tmp_path / "back.safetensors"
    loraformats.convert(source, "kohya", kohya, family="tiny-flux")
    loraformats.convert(kohya, "diffusers", back, family="tiny-flux")
    components = FLUX_COMPONENTS if clip else ("transformer",)

    first, first_counts = apply_in_diffusers("tiny-flux", source, components)
    second, second_counts = apply_in_diffusers("tiny-flux", back, components)

    expected = {key: first[key] for key in changed(first)}
    assert second_counts == first_counts == per_component(expected, components)
    assert_same_changes(expected, second)
    assert not worst(expected, reference_deltas(kohya, "tiny-flux"))

    ranks = {
        name.removeprefix("transformer.").removesuffix(".lora_A.weight"): tensor.shape[0]
        for name, tensor in load_file(str(source)).items()
        if name.startswith("transformer.") and name.endswith(".lora_A.weight")
    }
    fused = load_file(str(kohya))
    transformer = tiny_dit_family("tiny-flux").components["transformer"]
    groups = {
        group: members for group, members in transformer.groups.items() if transformer.nameable(group, "bfl")
    }
    assert len(groups) == 6  # img/txt qkv of 2 double blocks, linear1 of 2 single blocks
    for group, members in groups.items():
        stem = kohya_stem(transformer, group)
        down, up = fused[f"{stem}.lora_down.weight"], fused[f"{stem}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == sum(ranks[m] for m in members), stem
        widths = [transformer.modules[m].out_features for m in members]
        columns = [
            set(torch.nonzero(rows.ne(0).any(0)).flatten().tolist()) for rows in torch.split(up, widths)
        ]
        assert [len(c) for c in columns] == [ranks[m] for m in members], stem
        assert len(set().union(*columns)) == down.shape[0], f"{stem}: members share columns"


def test_partial_groups_fuse_with_zero_rows_for_the_members_not_adapted(tmp_path):
    """A diffusers Flux file adapting `to_q` and `to_v` of double block 0 (not `to_k`) and `to_k` and
    `proj_mlp` of single block 1 -> Kohya: `img_attn.qkv` / `linear1` at the adapted members' summed rank,
    exactly zero rows for the members not adapted, the adapted rows as in the source; diffusers' Kohya
    loader then changes exactly the adapted members."""
    targets = r"transformer_blocks\.0\.attn\.to_(q|v)|single_transformer_blocks\.1\.(attn\.to_k|proj_mlp)"
    source = make_peft_flux(tmp_path / "peft", lora_alpha=6, targets=targets, seed=10)
    output = tmp_path / "kohya.safetensors"
    source_deltas = diffusers_deltas(source)
    assert sorted(path for _, path in source_deltas) == [
        "single_transformer_blocks.1.attn.to_k", "single_transformer_blocks.1.proj_mlp",
        "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
    ]  # fmt: skip

    loraformats.convert(source, "kohya", output, family="tiny-flux")

    transformer = tiny_dit_family("tiny-flux").components["transformer"]
    groups = ("transformer_blocks.0.attn.to_qkv", "single_transformer_blocks.1.attn.to_qkv_mlp_proj")
    assert file_stems(output) == {kohya_stem(transformer, group) for group in groups}
    fused = load_file(str(output))
    named = named_deltas(output, "tiny-flux")
    for group in groups:
        adapted = [m for m in transformer.groups[group] if ("transformer", m) in source_deltas]
        assert fused[f"{kohya_stem(transformer, group)}.lora_down.weight"].shape[0] == 4 * len(adapted)
        members = canonical_rows(transformer, group, "bfl", named[("transformer", group)])
        for member, rows in members.items():
            if member in adapted:
                assert relative_error(source_deltas[("transformer", member)], rows) <= FP32_LIMIT, member
            else:
                assert bool(rows.eq(0).all()), f"{member} is not adapted but its rows are not zero"

    readable = tmp_path / "readable.safetensors"
    kohya_loader_readable(output, readable)  # linear1 out: diffusers cuts it at FLUX.1's widths
    changes, counts = apply_in_diffusers("tiny-flux", readable, ["transformer"])
    expected = {
        key: delta for key, delta in source_deltas.items() if key[1].startswith("transformer_blocks.0")
    }
    assert counts == {"transformer": 3}  # to_q, to_k (zero), to_v
    assert_same_changes(expected, changes)


def test_t5_modules_need_drop_component_for_diffusers(tmp_path, capsys):
    """Kohya Flux with `lora_te3_` (T5) modules -> diffusers, on the command line: refused (exit code 4,
    nothing written, `--drop-component text_encoder_2` suggested); with that option written, one drop
    step over the T5 modules reported, and every other module changes as in the source."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    stems = make_original(
        source, "tiny-flux", components=("transformer", "text_encoder", "text_encoder_2"), seed=11,
    )  # fmt: skip
    t5 = [stem for stem, key in stems.items() if key[0] == "text_encoder_2"]
    assert t5 and all(stem.startswith("lora_te3_encoder_block_") for stem in t5)
    arguments = ["convert", str(source), "--to", "diffusers", "-o", str(output), "--family", "tiny-flux"]

    assert main(arguments) == 4
    assert "--drop-component text_encoder_2" in capsys.readouterr().err
    assert not output.exists()

    assert main([*arguments, "--drop-component", "text_encoder_2", "--report", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    drops = [step for step in report["steps"] if step["stage"] == "drop"]
    assert len(drops) == 1 and drops[0]["modules"] == len(t5)
    t5_tensors = [name for name in load_file(str(source)) if name.startswith("lora_te3_")]
    assert len(report["dropped"]) == len(t5_tensors)  # every tensor left out is named
    assert {entry.rpartition(" ")[0] for entry in report["dropped"]} == {
        f"text_encoder_2:{stems[stem][1]}" for stem in t5
    }
    assert not any(name.startswith("text_encoder_2.") for name in load_file(str(output)))
    expected = {k: v for k, v in reference_deltas(source, "tiny-flux").items() if k[0] != "text_encoder_2"}
    changes, counts = apply_in_diffusers("tiny-flux", output, FLUX_COMPONENTS)
    assert counts == per_component(expected, FLUX_COMPONENTS)
    assert_same_changes(expected, changes)  # T5 (snapshotted too) unchanged


def test_dropping_a_component_the_file_does_not_adapt_says_so(tmp_path):
    """`--drop-component` of a component with no module in the file drops nothing, and says so."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    make_original(source, "tiny-flux", components=("transformer",), seed=13)
    report = loraformats.convert(source, "diffusers", output, family="tiny-flux", drop=["text_encoder"])
    assert report.dropped == [] and not any(step.stage == "drop" for step in report.steps)
    assert (
        "--drop-component text_encoder: the file adapts no module of it; nothing dropped" in report.warnings
    )
    loraformats.convert(source, "diffusers", tmp_path / "plain.safetensors", family="tiny-flux")
    assert set(load_file(str(output))) == set(load_file(str(tmp_path / "plain.safetensors")))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kohya_flux_converted_to_ai_toolkit_changes_every_module_as_the_source(tmp_path, dtype):
    """ai-toolkit output (diffusers names, scales folded, `software` metadata) loads in diffusers and
    changes every module as the Kohya source."""
    needs_format("ai-toolkit")
    source, output = tmp_path / "kohya.safetensors", tmp_path / "ai-toolkit.safetensors"
    make_original(source, "tiny-flux", dtype=dtype, seed=12)
    loraformats.convert(source, "ai-toolkit", output, family="tiny-flux")
    with safe_open(str(output), "pt") as handle:
        metadata = handle.metadata() or {}
    assert json.loads(metadata["software"])["name"] == "ai-toolkit"
    assert all(
        name.startswith(("transformer.", "text_encoder."))
        and name.endswith((".lora_A.weight", ".lora_B.weight"))
        for name in load_file(str(output))
    )
    expected = reference_deltas(source, "tiny-flux")
    changes, counts = apply_in_diffusers("tiny-flux", output, FLUX_COMPONENTS)
    assert counts == per_component(expected, FLUX_COMPONENTS)
    assert_same_changes(expected, changes)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"proj_out": (4, 6.0)}, id="alpha"),
        pytest.param({"proj_out": (8, 12.0)}, id="rank"),
    ],
)
def test_flux_top_level_proj_out_pattern_stays_on_its_module(tmp_path, overrides):
    """Kohya `final_layer_linear` (scale 1.5, rank 4 or 8) + `single_blocks_N_linear2` (rank 4, scale 1)
    -> diffusers (the non-power-of-two scale goes to `lora_adapter_metadata` as a pattern): each module
    keeps its own rank and scale in diffusers."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    single = {f"single_transformer_blocks.{i}.proj_out": (4, 4.0) for i in range(2)}
    make_original(
        source, "tiny-flux", components=["transformer"], seed=13, overrides={**single, **overrides},
        select=lambda path: path.endswith("proj_out"),
    )  # fmt: skip
    loraformats.convert(source, "diffusers", output, family="tiny-flux")
    expected = reference_deltas(source, "tiny-flux")
    assert len(expected) == 3
    changes, _ = apply_in_diffusers("tiny-flux", output, ["transformer"])
    assert_same_changes(expected, changes)


@pytest.mark.parametrize(
    ("family_name", "components"), [("tiny-flux", FLUX_COMPONENTS), ("tiny-sd3", SD3_COMPONENTS)]
)
def test_kohya_dit_converted_to_peft_merges_every_module_as_the_source(tmp_path, family_name, components):
    """Kohya in original names -> a PEFT adapter directory per component -> `PeftModel.from_pretrained`
    on the tiny model + `merge_and_unload`: every module changes by its slice of the fused ΔW."""
    from peft import PeftModel

    source, output = tmp_path / "kohya.safetensors", tmp_path / "peft"
    make_original(source, family_name, components=components, dtype=F32, seed=21)
    loraformats.convert(source, "peft", output, family=family_name)
    expected = reference_deltas(source, family_name)
    pipe = build_dit_pipeline(family_name)
    family = tiny_dit_family(family_name)
    before = snapshot(pipe, family, components)
    for name in components:
        model = PeftModel.from_pretrained(getattr(pipe, name), str(output / name))
        setattr(pipe, name, model.merge_and_unload())
    changes = module_changes(before, pipe)
    assert sorted(p.name for p in output.iterdir()) == sorted(components)
    assert_same_changes(expected, changes)
