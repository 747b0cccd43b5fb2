"""PEFT adapter directories against their consumers: PEFT itself, LyCORIS' Kohya loader and diffusers.

Sources are what `peft` writes: `get_peft_model(component, LoraConfig(..., init_lora_weights=False))`
on a tiny diffusers UNet, a transformers-5 `CLIPTextModel` and a `CLIPTextModelWithProjection`, every
lora_A, lora_B and lora_magnitude_vector set to random values, then `save_pretrained`. The expected
change of each module is `PeftModel.from_pretrained(...).merge_and_unload()` on a float64 copy of the
same seed-0 base. Converted files are applied by their own consumers (LyCORIS for Kohya, diffusers'
`load_lora_weights` + `fuse_lora`, `PeftModel.from_pretrained` + `merge_and_unload` for PEFT output) and
W' - W of every module is compared in float64 (relative Frobenius error <= 1e-6 in fp32 models).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraformats
from lora_factory import (
    PEFT_TEXT_TARGETS,
    PEFT_UNET_TARGETS,
    changed,
    component_module,
    count_lora_layers,
    kohya_stems,
    make_diffusers,
    make_kohya,
    module_changes,
    per_component,
    reference_deltas,
    relative_errors,
    snapshot,
    worst,
)
from loraformats.cli import main
from test_consumer_diffusers import apply_in_diffusers
from test_consumer_kohya import apply_with_lycoris
from tiny import build_pipeline, tiny_family

FP32_LIMIT = 1e-6  # per-module relative error (Frobenius) in an fp32 model
Key = tuple[str, str]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # the tiny pipelines' scheduler config

#: The model classes PEFT wraps: tiny-sd1 has a UNet and a `CLIPTextModel` (no `text_model.` in
#: transformers 5 names); tiny-sdxl adds a `CLIPTextModelWithProjection` (names keep `text_model.`).
COMPONENTS = {"tiny-sd1": ("unet", "text_encoder"), "tiny-sdxl": ("unet", "text_encoder", "text_encoder_2")}

#: Regex pattern keys as people write them: escaped dots, an alternation, unescaped dots, a general key
#: ahead of a specific one (PEFT takes the first key that matches, so `attn2\.to_k` is shadowed by `to_k`).
UNET_PATTERNS = {
    "rank_pattern": {r"attn1\.to_q": 8, "conv_shortcut": 2, r"down_blocks\.1\.resnets\.1\.conv1": 3},
    "alpha_pattern": {"to_k": 3, r"attn2\.to_k": 7, r"resnets\.0\.conv1": 5, "ff.net.2": 16,
                      r"to_(v|out\.0)": 2.5, "conv_shortcut": 1},
}  # fmt: skip
TEXT_PATTERNS = {
    "rank_pattern": {"fc1": 2, r"layers\.1\.self_attn\.(q|k)_proj": 8},
    "alpha_pattern": {"q_proj": 3, r"layers\.1\.mlp\.fc2": 2, r"encoder\.layers\.0\.self_attn\.v_proj": 5},
}
RSLORA_RANKS = {"unet": {"conv_shortcut": 3, r"attn1\.to_q": 8}, "text": {"fc1": 2, "out_proj": 1}}

#: LoraConfig arguments per variant (r=4 and lora_alpha=6 everywhere: scale 1.5, not a power of two).
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "patterns": {"patterns": True},
    "rslora": {"use_rslora": True, "ranks": True},  # scales 6/sqrt(r): irrational for r = 1, 2, 3, 8
    "dora": {"use_dora": True},
}


@pytest.fixture(autouse=True)
def quiet_loading():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("diffusers", "LyCORIS", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------ sources


def lora_config(name: str, variant: str, **overrides: Any):
    from peft import LoraConfig

    settings = dict(VARIANTS[variant])
    if settings.pop("patterns", False):
        settings.update(UNET_PATTERNS if name == "unet" else TEXT_PATTERNS)
    if settings.pop("ranks", False):
        settings["rank_pattern"] = RSLORA_RANKS["unet" if name == "unet" else "text"]
    targets = PEFT_UNET_TARGETS if name == "unet" else PEFT_TEXT_TARGETS
    arguments = {"r": 4, "lora_alpha": 6, "init_lora_weights": False, "target_modules": targets}
    return LoraConfig(**{**arguments, **settings, **overrides})


def randomise(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Every LoRA factor N(0, 1), every DoRA magnitude uniform in [0.5, 1.5); returns the LoRA layers."""
    from peft.tuners.lora import LoraLayer

    layers = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            layers += 1
            for factor in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                factor.copy_(torch.randn(factor.shape, generator=generator))
            if "default" in module.lora_magnitude_vector:
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.copy_(0.5 + torch.rand(magnitude.shape, generator=generator))
    return layers


def save_peft(
    directory: Path, family_name: str, name: str, variant: str = "plain", seed: int = 0, **overrides: Any
) -> Path:
    """One component adapted by `peft` (seed-0 base), randomised and saved with `save_pretrained`."""
    from peft import get_peft_model

    model = getattr(build_pipeline(family_name), name)
    peft_model = get_peft_model(model, lora_config(name, variant, **overrides))
    generator = torch.Generator().manual_seed(seed * 10 + list(COMPONENTS["tiny-sdxl"]).index(name))
    assert randomise(peft_model, generator)
    peft_model.save_pretrained(str(directory))
    return directory


def save_layout(root: Path, family_name: str, variant: str, seed: int = 0) -> Path:
    """The per-component layout: root/unet, root/text_encoder[, root/text_encoder_2], each saved by PEFT."""
    for name in COMPONENTS[family_name]:
        save_peft(root / name, family_name, name, variant, seed)
    return root


def canonical(name: str, model: torch.nn.Module, path: str) -> str:
    """The family's module path for a runtime name (transformers-5 `CLIPTextModel` has no `text_model.`)."""
    return f"text_model.{path}" if name != "unet" and not hasattr(model, "text_model") else path


def peft_changes(family_name: str, name: str, adapter: Path) -> dict[Key, torch.Tensor]:
    """W' - W per adapted module: PEFT's `merge_and_unload` on a float64 copy of the seed-0 base."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = getattr(build_pipeline(family_name), name).to(torch.float64)
    base = {path: module.weight.detach().clone() for path, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}  # fmt: skip
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    adapted = [path.removeprefix("base_model.model.") for path, module in peft_model.named_modules()
               if isinstance(module, LoraLayer)]  # fmt: skip
    merged = peft_model.merge_and_unload()
    return {
        (name, canonical(name, merged, path)): merged.get_submodule(path).weight.detach() - base[path]
        for path in adapted
    }


def layout_changes(family_name: str, root: Path) -> dict[Key, torch.Tensor]:
    expected: dict[Key, torch.Tensor] = {}
    for name in COMPONENTS[family_name]:
        if (root / name).is_dir():
            expected |= peft_changes(family_name, name, root / name)
    return expected


def expected_counts(family_name: str, keys) -> dict[str, int]:
    return {name: 0 for name in tiny_family(family_name).components} | per_component(keys)


def assert_same_changes(expected, changes, limit: float = FP32_LIMIT) -> None:
    assert changed(changes) == set(expected), "the modules changed are not exactly the source's modules"
    assert not worst(relative_errors(expected, changes), limit)


@pytest.fixture(scope="module")
def peft_sources(tmp_path_factory):
    """Built once per module: (family, variant) -> (per-component layout, expected changes)."""
    cache: dict[tuple[str, str], tuple[Path, dict[Key, torch.Tensor]]] = {}

    def get(family_name: str, variant: str) -> tuple[Path, dict[Key, torch.Tensor]]:
        if (family_name, variant) not in cache:
            root = tmp_path_factory.mktemp(f"{family_name}-{variant}") / "lora"
            save_layout(root, family_name, variant)
            cache[(family_name, variant)] = root, layout_changes(family_name, root)
        return cache[(family_name, variant)]

    return get


# -------------------------------------------------------------------------------- PEFT as a consumer


def apply_with_peft(family_name: str, output: Path) -> tuple[dict[Key, torch.Tensor], dict[str, int]]:
    """Load every component directory of `output` with `PeftModel.from_pretrained` into a fresh seed-0 fp32
    model, check that PEFT loaded every tensor of the file and nothing else, merge and unload.

    Returns (W' - W per module in float64, LoRA layers per component).
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    pipe = build_pipeline(family_name)
    family = tiny_family(family_name)
    counts = {name: 0 for name in family.components}
    changes: dict[Key, torch.Tensor] = {}
    for name in family.components:
        directory = output / name
        model = getattr(pipe, name)
        base = {path: module.weight.detach().to(torch.float64) for path, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}  # fmt: skip
        if not directory.is_dir():
            continue
        stored = load_file(directory / "adapter_model.safetensors")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, str(directory))
        complaints = [str(w.message) for w in caught if "key" in str(w.message).lower()]
        assert not complaints, complaints  # "Found missing adapter keys ...", unexpected keys
        loaded: dict[str, torch.Tensor] = {}
        for path, module in peft_model.named_modules():
            if isinstance(module, LoraLayer):
                counts[name] += 1
                loaded[f"{path}.lora_A.weight"] = module.lora_A["default"].weight
                loaded[f"{path}.lora_B.weight"] = module.lora_B["default"].weight
                if "default" in module.lora_magnitude_vector:
                    loaded[f"{path}.lora_magnitude_vector"] = module.lora_magnitude_vector["default"].weight
        assert sorted(loaded) == sorted(stored), "PEFT's LoRA parameters are not exactly the file's tensors"
        for key, tensor in stored.items():
            assert torch.equal(loaded[key].detach(), tensor.to(loaded[key].dtype)), key
        merged = peft_model.merge_and_unload()
        for path, module in merged.named_modules():
            if path in base:
                weight = module.weight.detach().to(torch.float64)
                changes[(name, canonical(name, merged, path))] = weight - base[path]
    return changes, counts


def apply_in_diffusers_with_dora(family_name: str, lora: Path):
    """`apply_in_diffusers`, except that the text encoders' DoRA magnitudes are copied in from the file.

    diffusers loads text-encoder LoRAs through transformers' `load_adapter`, which (transformers 5.23)
    leaves every `lora_magnitude_vector` of the state dict unloaded (reported as missing keys) and keeps
    PEFT's initial weight norms. Everything else (factors, scales, `use_dora`) is diffusers' own loading.
    """
    from peft.tuners.lora import LoraLayer

    family = tiny_family(family_name)
    pipe = build_pipeline(family_name)
    before = snapshot(pipe, family)
    pipe.load_lora_weights(str(lora), adapter_name="lora")
    stored = load_file(lora)
    with torch.no_grad():
        for component in family.text_encoders():
            model = getattr(pipe, component.name)
            for path, module in model.named_modules():
                if isinstance(module, LoraLayer) and "lora" in module.lora_magnitude_vector:
                    spellings = [
                        f"{component.name}.{p}.lora_magnitude_vector" for p in (path, f"text_model.{path}")
                    ]
                    key = next(k for k in spellings if k in stored)
                    module.lora_magnitude_vector["lora"].weight.copy_(stored[key])
    counts = count_lora_layers(pipe, "lora")
    pipe.fuse_lora(components=list(family.components), lora_scale=1.0)
    return module_changes(before, pipe), counts


# -------------------------------------------------------------------- 1. PEFT saves -> kohya, diffusers

#: Every variant on tiny-sdxl (a UNet, a `CLIPTextModel` and a `CLIPTextModelWithProjection`); tiny-sd1's
#: other UNet layout (conv proj_in, attention in the first block) with the plain and pattern configs.
FAMILY_VARIANTS = [
    *(pytest.param("tiny-sd1", variant, id=f"sd1-{variant}") for variant in ("plain", "patterns")),
    *(pytest.param("tiny-sdxl", variant, id=f"sdxl-{variant}") for variant in VARIANTS),
]


@pytest.mark.parametrize(("family_name", "variant"), FAMILY_VARIANTS)
def test_peft_saved_adapters_converted_to_kohya_change_every_module_as_peft_merges_them(
    tmp_path, peft_sources, family_name, variant
):
    """Per-component layout -> Kohya (diffusers module names), merged by LyCORIS' Kohya loader."""
    source, expected = peft_sources(family_name, variant)
    output = tmp_path / "kohya.safetensors"
    report = loraformats.convert(source, "kohya", output, family=family_name, options={"naming": "canonical"})

    changes, counts = apply_with_lycoris(family_name, output)

    assert report.modules == len(expected)
    assert counts == expected_counts(family_name, expected)
    assert_same_changes(expected, changes)


@pytest.mark.parametrize(("family_name", "variant"), FAMILY_VARIANTS)
def test_peft_saved_adapters_converted_to_diffusers_change_every_module_as_peft_merges_them(
    tmp_path, peft_sources, family_name, variant
):
    """Per-component layout -> one diffusers file, `load_lora_weights` + `fuse_lora` in a tiny pipeline."""
    source, expected = peft_sources(family_name, variant)
    output = tmp_path / "diffusers.safetensors"
    report = loraformats.convert(source, "diffusers", output, family=family_name)

    apply = apply_in_diffusers_with_dora if variant == "dora" else apply_in_diffusers
    changes, counts = apply(family_name, output)

    assert report.modules == len(expected)
    assert counts == expected_counts(family_name, expected)
    assert_same_changes(expected, changes)


SINGLE_DIRECTORIES = [
    pytest.param("tiny-sd1", "unet", "patterns", "kohya", id="sd1-unet-patterns-kohya"),
    pytest.param("tiny-sd1", "text_encoder", "plain", "diffusers", id="sd1-clip-plain-diffusers"),
    pytest.param("tiny-sdxl", "unet", "rslora", "kohya", id="sdxl-unet-rslora-kohya"),
    pytest.param("tiny-sdxl", "unet", "dora", "diffusers", id="sdxl-unet-dora-diffusers"),
]


@pytest.mark.parametrize(("family_name", "name", "variant", "target"), SINGLE_DIRECTORIES)
def test_a_single_adapter_directory_converts_with_family(
    tmp_path, capsys, peft_sources, family_name, name, variant, target
):
    """`loraformats convert ADAPTER_DIR --family F` on one directory PEFT saved: the component is found by
    names and shapes."""
    layout, changes = peft_sources(family_name, variant)
    source, output = layout / name, tmp_path / f"out.{target}.safetensors"
    arguments = ["convert", str(source), "--to", target, "-o", str(output), "--family", family_name]
    if target == "kohya":
        arguments += ["--set", "naming=canonical"]
    assert main(arguments) == 0, capsys.readouterr().err
    expected = {key: change for key, change in changes.items() if key[0] == name}

    apply = apply_with_lycoris if target == "kohya" else apply_in_diffusers_with_dora
    changes, counts = apply(family_name, output)

    assert counts == expected_counts(family_name, expected)
    assert_same_changes(expected, changes)


def test_a_single_text_encoder_2_directory_is_not_silently_read_as_text_encoder(tmp_path):
    """tiny-sdxl's two CLIP encoders have the same shapes: a lone text_encoder_2 adapter either lands on
    text_encoder_2 (its directory name, its `text_model.` names) or is refused as ambiguous."""
    source = save_peft(tmp_path / "text_encoder_2", "tiny-sdxl", "text_encoder_2", seed=4)
    output = tmp_path / "kohya.safetensors"
    try:
        loraformats.convert(source, "kohya", output, family="tiny-sdxl")
    except loraformats.LoraFormatsError as error:
        assert "ambiguous" in error.message
        return
    assert {name.split("_")[1] for name in load_file(output)} == {"te2"}


# -------------------------------------------------------------- 2. kohya, diffusers -> PEFT directories

KOHYA_SOURCES = [
    pytest.param("tiny-sd1", "canonical", torch.float16, id="sd1-fp16"),
    pytest.param("tiny-sdxl", "ldm", torch.bfloat16, id="sdxl-ldm-bf16"),
]


@pytest.mark.parametrize(("family_name", "naming", "dtype"), KOHYA_SOURCES)
def test_kohya_converted_to_peft_loads_every_tensor_and_merges_as_the_source(
    tmp_path, family_name, naming, dtype
):
    """Mixed alphas (some absent), ranks 4/2/8, Tucker cores: PEFT loads each file exactly and merges the
    source's changes."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "peft"
    make_kohya(source, family_name, naming=naming, dtype=dtype, rank=(4, 2, 8), alpha="mixed", seed=21)
    report = loraformats.convert(source, "peft", output, family=family_name)
    expected = reference_deltas(source, family_name)

    changes, counts = apply_with_peft(family_name, output)

    assert sorted(p.name for p in output.iterdir()) == sorted(tiny_family(family_name).components)
    assert report.modules == len(expected)
    assert counts == expected_counts(family_name, expected)
    assert_same_changes(expected, changes)


def add_dora_scale(path: Path, family_name: str, axis: str, components=None, seed: int = 0) -> None:
    """Give every module of `components` a LyCORIS `dora_scale`: (out, 1[, 1, 1]) or (1, in[, 1, 1])."""
    stems = kohya_stems(tiny_family(family_name))
    family = tiny_family(family_name)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(path)
    for stem in sorted({name.partition(".")[0] for name in tensors}):
        component, module_path = stems[stem]
        if components is not None and component not in components:
            continue
        layer = family.components[component].modules[module_path]
        trailing = (1, 1) if layer.kind == "conv2d" else ()
        shape = (layer.out_features, 1, *trailing) if axis == "output" else (1, layer.in_features, *trailing)
        dtype = tensors[f"{stem}.lora_up.weight"].dtype
        tensors[f"{stem}.dora_scale"] = (0.5 + torch.rand(shape, generator=generator)).to(dtype)
    save_file(tensors, path)


def dora_reference(path: Path, family_name: str) -> dict[Key, torch.Tensor]:
    """W' - W of an output-axis DoRA Kohya file, float64: m * V / ||V|| per output row, V = W + ΔW."""
    family = tiny_family(family_name)
    pipe = build_pipeline(family_name)
    deltas = reference_deltas_without_dora(path, family_name)
    stems = kohya_stems(family)
    scales = {stems[name.partition(".")[0]]: tensor for name, tensor in load_file(path).items()
              if name.endswith("dora_scale")}  # fmt: skip
    expected = {}
    for key, delta in deltas.items():
        weight = component_module(pipe, key).weight.detach().to(torch.float64)
        combined = weight + delta
        norm = combined.reshape(combined.shape[0], -1).norm(dim=1)
        magnitude = scales[key].to(torch.float64).reshape(-1)
        shape = (-1,) + (1,) * (combined.dim() - 1)
        expected[key] = combined * (magnitude / norm).reshape(shape) - weight
    return expected


def reference_deltas_without_dora(path: Path, family_name: str) -> dict[Key, torch.Tensor]:
    plain = path.with_name("plain.safetensors")
    save_file({k: v for k, v in load_file(path).items() if not k.endswith("dora_scale")}, plain)
    return reference_deltas(plain, family_name)


def test_kohya_dora_converted_to_peft_merges_as_the_source(tmp_path):
    """Output-axis `dora_scale` on every module -> `use_dora` configs and `lora_magnitude_vector`s."""
    source, output = tmp_path / "kohya.safetensors", tmp_path / "peft"
    make_kohya(source, "tiny-sd1", dtype=torch.float32, rank=(4, 8), alpha="varied", tucker=False, seed=22)
    add_dora_scale(source, "tiny-sd1", "output", seed=22)
    loraformats.convert(source, "peft", output, family="tiny-sd1")
    expected = dora_reference(source, "tiny-sd1")

    changes, counts = apply_with_peft("tiny-sd1", output)

    assert counts == expected_counts("tiny-sd1", expected)
    assert_same_changes(expected, changes)


def test_diffusers_lora_converted_to_peft_loads_every_tensor_and_merges_as_peft(tmp_path):
    """A diffusers-saved fp16 SDXL LoRA with rank/alpha patterns (`lora_adapter_metadata`) -> PEFT dirs."""
    source, expected = make_diffusers(tmp_path / "diffusers", "tiny-sdxl", patterns=True, dtype=torch.float16)
    output = tmp_path / "peft"
    loraformats.convert(source, "peft", output, family="tiny-sdxl")

    changes, counts = apply_with_peft("tiny-sdxl", output)

    assert counts == expected_counts("tiny-sdxl", expected)
    assert_same_changes(expected, changes)


def test_peft_output_of_a_peft_source_loads_back_into_peft(tmp_path, peft_sources):
    """peft -> peft (a rewrite): PEFT loads what loraformats wrote and merges the source's changes."""
    source, expected = peft_sources("tiny-sdxl", "patterns")
    output = tmp_path / "peft"
    loraformats.convert(source, "peft", output, family="tiny-sdxl")

    changes, counts = apply_with_peft("tiny-sdxl", output)

    assert counts == expected_counts("tiny-sdxl", expected)
    assert_same_changes(expected, changes)
