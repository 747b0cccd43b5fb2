"""Trainer dialects of the DiT era on tiny-flux: XLabs, OneTrainer, fal Kontext, BFL control (read-only),
ai-toolkit and ComfyUI (read/write).

Detection must name each from the header alone. Conversions are checked module by module: the ΔW of
every canonical module is computed independently from the raw tensors of the source and of the output
(the key grammars are written out here, names resolve through the family tables only), in float64.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loraformats
from loraformats.cli import main
from loraformats.plugins import registry
from loraformats.verification import verify
from tiny import tiny_dit_family

FAMILY = "tiny-flux"
FLUX = tiny_dit_family(FAMILY)
DIT = FLUX.components["transformer"]
CANONICAL = "canonical"

# --- Independent readers ------------------------------------------------------------------------

DOWN = r"lora_down\.weight|lora_A\.weight|down\.weight"
UP = r"lora_up\.weight|lora_B\.weight|up\.weight"
ROLES = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "down.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "up.weight": "up",
    "alpha": "alpha",
}
TE = {"text_encoder": ("text_encoder", CANONICAL), "text_encoder_2": ("text_encoder_2", CANONICAL)}

#: grammar -> (key pattern with `prefix` / `name` / `role`, prefix -> (component, naming), names flattened)
GRAMMARS: dict[str, tuple[str, dict[str, tuple[str, str]], bool]] = {
    "kohya": (
        r"lora_(?P<prefix>unet|te\d)_(?P<name>[^.]+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)",
        {"unet": ("transformer", "bfl"), "te1": TE["text_encoder"], "te3": TE["text_encoder_2"]},
        True,
    ),
    "onetrainer": (
        r"lora_(?P<prefix>transformer|te\d)_(?P<name>[^.]+)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)",
        {"transformer": ("transformer", CANONICAL), "te1": TE["text_encoder"], "te2": TE["text_encoder_2"]},
        True,
    ),
    "comfyui": (
        rf"(?P<prefix>diffusion_model|text_encoders\.clip_l\.transformer|text_encoders\.t5xxl\.transformer)"
        rf"\.(?P<name>.+)\.(?P<role>{DOWN}|{UP}|alpha)",
        {
            "diffusion_model": ("transformer", "bfl"),
            "text_encoders.clip_l.transformer": TE["text_encoder"],
            "text_encoders.t5xxl.transformer": TE["text_encoder_2"],
        },
        False,
    ),
    "diffusers": (
        r"(?P<prefix>transformer|text_encoder)\.(?P<name>.+)\.(?P<role>lora_A\.weight|lora_B\.weight)",
        {"transformer": ("transformer", CANONICAL), "text_encoder": TE["text_encoder"]},
        False,
    ),
    "xlabs": (
        r"(?P<prefix>(?:diffusion_model\.)?)(?P<name>.+)\.(?P<role>down\.weight|up\.weight)",
        {"": ("transformer", "xlabs"), "diffusion_model.": ("transformer", "xlabs")},
        False,
    ),
    "fal": (
        r"(?P<prefix>base_model\.model)\.(?P<name>.+)\.(?P<role>lora_A\.weight|lora_B\.weight)",
        {"base_model.model": ("transformer", "bfl")},
        False,
    ),
    "bfl": (
        r"(?P<prefix>)(?P<name>.+)\.(?P<role>lora_A\.weight|lora_B\.weight)",
        {"": ("transformer", "bfl")},
        False,
    ),
}


def names(component: str, naming: str, flat: bool) -> dict[str, str]:
    """Name in `naming` (dots turned to underscores when `flat`) -> module or group path, from the tables."""
    table = FLUX.components[component]
    found = {table.name_in(path, naming): path for path in table.named_paths(naming)}
    if flat:
        found = {name.replace(".", "_"): path for name, path in found.items()}
    assert len(found) == len(table.named_paths(naming)), "flattened names collide"
    return found


def raw_modules(path: Path, grammar: str) -> dict[tuple[str, str, str], dict[str, torch.Tensor]]:
    """(component, naming, path in the table) -> {down, up[, alpha]} for every module of the file."""
    pattern, prefixes, flat = GRAMMARS[grammar]
    modules: dict[tuple[str, str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in load_file(path).items():
        found = re.fullmatch(pattern, key)
        assert found is not None, f"{key} is not a {grammar} key"
        component, naming = prefixes[found["prefix"]]
        module = names(component, naming, flat)[found["name"]]
        role = ROLES[found["role"]]
        assert role not in modules[component, naming, module], f"{key}: second {role}"
        modules[component, naming, module][role] = tensor
    return dict(modules)


def deltas(path: Path, grammar: str) -> dict[tuple[str, str], torch.Tensor]:
    """(component, canonical module) -> float64 ΔW = alpha/r · up @ down (scale 1 without alpha), the
    naming's rows put in canonical order, fused modules sliced into their members' rows."""
    if grammar == "diffusers":
        with safe_open(path, "pt") as f:
            assert "lora_adapter_metadata" not in (f.metadata() or {}), "scale must be in the weights"
    found: dict[tuple[str, str], torch.Tensor] = {}
    for (component, naming, module), factors in raw_modules(path, grammar).items():
        table = FLUX.components[component]
        down, up = factors["down"].double(), factors["up"].double()
        scale = factors["alpha"].double().item() / down.shape[0] if "alpha" in factors else 1.0
        delta = scale * (up @ down)
        order = table.row_order(module, naming)
        if order:
            delta = torch.cat([delta[start:end] for start, end in order])
        row = 0
        for member in table.groups.get(module, (module,)):
            rows = table.modules[member].out_features
            assert (component, member) not in found, f"{member} adapted twice"
            found[component, member] = delta[row : row + rows]
            row += rows
        assert row == delta.shape[0] == table.modules[module].out_features
    return found


def assert_same_deltas(actual: dict, expected: dict, rtol: float = 1e-12) -> None:
    """Same modules; every ΔW equal up to `rtol` of its largest entry."""
    assert sorted(actual) == sorted(expected)
    for key, want in expected.items():
        error = (actual[key] - want).abs().max().item()
        assert error <= rtol * want.abs().max().item(), f"{key}: max error {error:.3g}"


def ranks(path: Path) -> dict[str, int]:
    """Tensor stem -> rank (rows of every down factor) of a file, from its header."""
    with safe_open(path, "pt") as f:
        return {
            key.rsplit(".", 2)[0]: f.get_slice(key).get_shape()[0]
            for key in list(f.keys())
            if key.endswith(("lora_down.weight", "lora_A.weight", ".down.weight"))
        }


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def unreadable_data():
    """Any attempt to read tensor data fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("detection read tensor data")

    return mock.patch.object(os, "pread", refuse)


# --- Source files ------------------------------------------------------------------------------


def lora(tensors: dict, stem: str, layer, rank: int, generator, spelling=("lora_down", "lora_up"), **kw):
    """Random N(0,1) factors of `layer` under `stem` (+ `alpha` when given, + dtype)."""
    dtype = kw.get("dtype", torch.float32)
    tensors[f"{stem}.{spelling[0]}.weight"] = torch.randn(rank, layer.in_features, generator=generator).to(
        dtype
    )
    tensors[f"{stem}.{spelling[1]}.weight"] = torch.randn(layer.out_features, rank, generator=generator).to(
        dtype
    )
    if kw.get("alpha") is not None:
        tensors[f"{stem}.alpha"] = torch.tensor(kw["alpha"], dtype=dtype)


def linears(component: str, naming: str = CANONICAL) -> list[str]:
    table = FLUX.components[component]
    return [p for p in table.named_paths(naming) if table.modules[p].kind == "linear"]


CLIP_PATHS = linears("text_encoder")[:3]
T5_PATHS = linears("text_encoder_2")[:3]


def write_xlabs(path: Path, prefix: str = "diffusion_model.", seed: int = 1) -> Path:
    """Every XLabs processor module, rank 4, no alpha."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for module in DIT.named_paths("xlabs"):
        stem = prefix + DIT.name_in(module, "xlabs")
        lora(tensors, stem, DIT.modules[module], 4, generator, ("down", "up"))
    save_file(tensors, path)
    return path


#: OneTrainer modules: (component, path, rank, alpha). Power-of-two scales where diffusers must fold.
ONETRAINER = [
    *(
        ("transformer", f"transformer_blocks.0.attn.to_{p}", r, a)
        for p, r, a in [("q", 2, 1.0), ("k", 4, 8.0), ("v", 3, 3.0)]
    ),
    *(
        ("transformer", f"single_transformer_blocks.1.{p}", r, a)
        for p, r, a in [
            ("attn.to_q", 2, 4.0),
            ("attn.to_k", 2, 2.0),
            ("attn.to_v", 4, 1.0),
            ("proj_mlp", 3, 6.0),
        ]
    ),
    *(("transformer", f"single_transformer_blocks.0.attn.to_{p}", 2, 1.0) for p in "qkv"),  # no proj_mlp
    ("transformer", "transformer_blocks.1.ff.net.2", 4, 2.0),
    ("transformer", "norm_out.linear", 2, 1.0),
    ("text_encoder", CLIP_PATHS[0], 2, 4.0),
    *(("text_encoder_2", path, 2, 3.0) for path in T5_PATHS[:2]),
]
OT_PREFIX = {"transformer": "lora_transformer_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def write_onetrainer(path: Path, seed: int = 2) -> Path:
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for component, module, rank, alpha in ONETRAINER:
        stem = OT_PREFIX[component] + module.replace(".", "_")
        lora(tensors, stem, FLUX.components[component].modules[module], rank, generator, alpha=alpha)
    save_file(tensors, path)
    return path


def write_original(path: Path, prefix: str, seed: int = 3, extra: dict | None = None) -> Path:
    """Every BFL-named module with lora_A / lora_B after `prefix`, rank 3, no alpha (+ `extra` tensors)."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for module in DIT.named_paths("bfl"):
        lora(
            tensors,
            prefix + DIT.name_in(module, "bfl"),
            DIT.modules[module],
            3,
            generator,
            ("lora_A", "lora_B"),
        )
    save_file({**tensors, **(extra or {})}, path)
    return path


def write_kohya(path: Path, seed: int = 4) -> Path:
    """Kohya Flux: every BFL module, CLIP-L and T5 (`lora_te3_`), bf16, alpha/rank not a power of two."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for module in DIT.named_paths("bfl"):
        stem = "lora_unet_" + DIT.name_in(module, "bfl").replace(".", "_")
        lora(tensors, stem, DIT.modules[module], 4, generator, alpha=3.0, dtype=torch.bfloat16)
    for component, prefix, paths in (
        ("text_encoder", "lora_te1_", CLIP_PATHS),
        ("text_encoder_2", "lora_te3_", T5_PATHS),
    ):
        for module in paths:
            layer = FLUX.components[component].modules[module]
            lora(
                tensors,
                prefix + module.replace(".", "_"),
                layer,
                2,
                generator,
                alpha=1.5,
                dtype=torch.bfloat16,
            )
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora_flux"})
    return path


def write_diffusers(path: Path, seed: int = 5, meta: dict | None = None) -> Path:
    """diffusers' own Flux file: `transformer.` + canonical path + lora_A / lora_B, scale 1."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for module in DIT.named_paths(CANONICAL):
        lora(tensors, f"transformer.{module}", DIT.modules[module], 2, generator, ("lora_A", "lora_B"))
    for module in CLIP_PATHS:
        layer = FLUX.components["text_encoder"].modules[module]
        lora(tensors, f"text_encoder.{module}", layer, 2, generator, ("lora_A", "lora_B"))
    save_file(tensors, path, metadata=meta)
    return path


def write_comfyui(path: Path, seed: int = 6) -> Path:
    """ComfyUI: BFL names under diffusion_model., CLIP-L and T5 under text_encoders.; some lora_A/lora_B."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for index, module in enumerate(DIT.named_paths("bfl")):
        spelling = ("lora_A", "lora_B") if index % 3 == 0 else ("lora_down", "lora_up")
        alpha = None if index % 3 == 0 else 2.0 + index
        stem = "diffusion_model." + DIT.name_in(module, "bfl")
        lora(tensors, stem, DIT.modules[module], 3, generator, spelling, alpha=alpha)
    for component, encoder, paths in (
        ("text_encoder", "clip_l", CLIP_PATHS),
        ("text_encoder_2", "t5xxl", T5_PATHS),
    ):
        for module in paths:
            stem = f"text_encoders.{encoder}.transformer.{module}"
            lora(tensors, stem, FLUX.components[component].modules[module], 2, generator, alpha=1.0)
    save_file(tensors, path)
    return path


def without_software(source: Path, path: Path) -> Path:
    """A copy of an ai-toolkit file with its `software` metadata entry removed."""
    meta = {k: v for k, v in metadata(source).items() if k != "software"}
    save_file(load_file(source), path, metadata=meta)
    return path


def expect_refusal(capsys, args: list[str], *needles: str) -> tuple[int, str]:
    """Run the CLI; it must fail with one line on stderr (no traceback) naming every needle."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return code, err


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """One file per dialect (ai-toolkit written by converting the Kohya file)."""
    root = tmp_path_factory.mktemp("dialects")
    files = {
        "xlabs": write_xlabs(root / "xlabs.safetensors"),
        "xlabs, no prefix": write_xlabs(root / "xlabs_bare.safetensors", prefix=""),
        "onetrainer": write_onetrainer(root / "onetrainer.safetensors"),
        "fal-kontext": write_original(root / "fal.safetensors", "base_model.model."),
        "bfl-control": write_original(root / "bfl.safetensors", ""),
        "bfl-control, norm scales": write_original(
            root / "bfl_scales.safetensors",
            "",
            extra={"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16)},
        ),
        "kohya": write_kohya(root / "kohya.safetensors"),
        "diffusers": write_diffusers(root / "diffusers.safetensors"),
        "comfyui": write_comfyui(root / "comfyui.safetensors"),
    }
    loraformats.convert(files["kohya"], "ai-toolkit", root / "aitk.safetensors", drop=["text_encoder_2"])
    files["ai-toolkit"] = root / "aitk.safetensors"
    files["ai-toolkit, no software"] = without_software(files["ai-toolkit"], root / "aitk_bare.safetensors")
    return files


# --- 1. Detection ------------------------------------------------------------------------------

DETECTIONS = [
    pytest.param("xlabs", "xlabs", id="xlabs"),
    pytest.param("xlabs, no prefix", "xlabs", id="xlabs-no-prefix"),
    pytest.param("onetrainer", "onetrainer", id="onetrainer"),
    pytest.param("fal-kontext", "fal-kontext", id="fal-kontext"),  # refines peft's key grammar
    pytest.param("bfl-control", "bfl-control", id="bfl-control"),  # refines diffusers' suffixes
    pytest.param("bfl-control, norm scales", "bfl-control", id="bfl-control-norm-scales"),
    pytest.param("ai-toolkit", "ai-toolkit", id="ai-toolkit"),
    pytest.param("ai-toolkit, no software", "diffusers", id="ai-toolkit-without-software"),
    pytest.param("comfyui", "comfyui", id="comfyui"),
    pytest.param("kohya", "kohya", id="kohya"),
    pytest.param("diffusers", "diffusers", id="diffusers"),
]


@pytest.mark.parametrize(("source", "expected"), DETECTIONS)
def test_detection_names_dialect_and_family_from_the_header(sources, source, expected):
    with unreadable_data():
        result = loraformats.detect(sources[source])
    assert (result.format, result.family) == (expected, FAMILY), result.reasons
    assert result.reasons


def test_ai_toolkit_metadata_names_it(sources):
    assert json.loads(metadata(sources["ai-toolkit"])["software"])["name"] == "ai-toolkit"
    assert "software" not in metadata(sources["ai-toolkit, no software"])


# --- 2. XLabs ----------------------------------------------------------------------------------

XLABS_TARGETS = {"kohya": "kohya", "comfyui": "comfyui", "diffusers": "diffusers", "ai-toolkit": "diffusers"}


@pytest.mark.parametrize("target", XLABS_TARGETS)
def test_xlabs_converts_with_the_same_deltas(sources, tmp_path, target):
    source = sources["xlabs"]
    expected = deltas(source, "xlabs")
    # per double block: two q/k/v + two projections; per single block: q/k/v + proj_out
    assert len(expected) == 2 * (3 + 3 + 1 + 1) + 2 * (3 + 1)
    output = tmp_path / f"out.{target}.safetensors"
    report = loraformats.convert(source, target, output)
    assert report.exactness.value in ("identical", "exact"), [(s.name, s.exactness) for s in report.steps]
    actual = deltas(output, XLABS_TARGETS[target])
    if target in ("kohya", "comfyui"):
        # qkv_lora is linear1's first rows: written as linear1 with proj_mlp rows exactly zero
        for block in (0, 1):
            mlp = actual.pop(("transformer", f"single_transformer_blocks.{block}.proj_mlp"))
            assert mlp.shape == (DIT.modules[f"single_transformer_blocks.{block}.proj_mlp"].out_features, 32)
            assert torch.count_nonzero(mlp) == 0
        out_ranks = ranks(output)
        assert len(out_ranks) == len(ranks(source)) == 12  # one module per XLabs module: nothing split
        assert set(out_ranks.values()) == {4}  # shared down: no rank inflation
        stem = (
            "lora_unet_single_blocks_0_linear1"
            if target == "kohya"
            else "diffusion_model.single_blocks.0.linear1"
        )
        assert stem in out_ranks
    else:
        assert len(ranks(output)) == 24 and set(ranks(output).values()) == {4}
        assert ("software" in metadata(output)) == (target == "ai-toolkit")
    assert_same_deltas(actual, expected)


@pytest.mark.parametrize("target", ["comfyui", "ai-toolkit", "diffusers", "kohya", "lycoris", "peft"])
@pytest.mark.parametrize("source", ["xlabs", "onetrainer"])
def test_read_only_dialects_convert_to_every_writable_format(sources, tmp_path, source, target):
    """Every writable format holds the same change per module (T5 left out where the target cannot
    hold it); `verify` compares low-rank changes exactly, fused and split layouts lined up."""
    assert target in {name for name, fmt in registry.formats().items() if fmt.writable}
    drop = ["text_encoder_2"] if source == "onetrainer" and target in ("diffusers", "ai-toolkit") else []
    output = tmp_path / (f"out.{target}" + ("" if target == "peft" else ".safetensors"))
    report = loraformats.convert(sources[source], target, output, drop=drop)
    # the OneTrainer sample's members have their own scales: fused block-diagonally, ups in float32
    assert report.exactness.value in ("identical", "exact", "rounded", "approximate" if drop else "exact")
    result = verify(sources[source], output)
    assert result.max_relative_error < (1e-6 if report.exactness.value != "identical" else 1e-12)
    assert not result.failures and not result.only_in_b
    assert result.only_in_a == [f"text_encoder_2:{path}" for path in T5_PATHS[:2]] if drop else result.ok


# --- 3. OneTrainer -----------------------------------------------------------------------------


def test_onetrainer_to_kohya_fuses_members_and_renumbers_t5(sources, tmp_path):
    source = sources["onetrainer"]
    expected = deltas(source, "onetrainer")
    assert len(expected) == len(ONETRAINER) == 15
    output = tmp_path / "out.safetensors"
    loraformats.convert(source, "kohya", output)
    stems = ranks(output)
    assert set(stems) == {
        "lora_unet_double_blocks_0_img_attn_qkv",
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_single_blocks_1_linear1",
        "lora_unet_double_blocks_1_img_mlp_2",
        "lora_unet_final_layer_adaLN_modulation_1",
        "lora_te1_" + CLIP_PATHS[0].replace(".", "_"),
        *("lora_te3_" + path.replace(".", "_") for path in T5_PATHS[:2]),
    }
    # members with their own downs are fused block-diagonally: ranks add up
    assert stems["lora_unet_double_blocks_0_img_attn_qkv"] == 2 + 4 + 3
    assert stems["lora_unet_single_blocks_1_linear1"] == 2 + 2 + 4 + 3
    assert stems["lora_unet_single_blocks_0_linear1"] == 3 * 2
    actual = deltas(output, "kohya")
    assert torch.count_nonzero(actual.pop(("transformer", "single_transformer_blocks.0.proj_mlp"))) == 0
    assert_same_deltas(actual, expected)


def test_onetrainer_to_diffusers_refuses_t5_unless_dropped(sources, tmp_path, capsys):
    source, output = sources["onetrainer"], tmp_path / "out.safetensors"
    code, _ = expect_refusal(
        capsys, ["convert", str(source), "--to", "diffusers", "-o", str(output)], "text_encoder_2"
    )
    assert code == 4 and not output.exists()
    args = [
        "convert",
        str(source),
        "--to",
        "diffusers",
        "-o",
        str(output),
        "--drop-component",
        "text_encoder_2",
    ]
    assert main(args) == 0, capsys.readouterr().err
    expected = {
        key: delta for key, delta in deltas(source, "onetrainer").items() if key[0] != "text_encoder_2"
    }
    assert len(expected) == 13
    assert_same_deltas(deltas(output, "diffusers"), expected)


# --- 4. fal Kontext ----------------------------------------------------------------------------


def test_fal_kontext_to_diffusers_splits_fused_modules(sources, tmp_path):
    source, output = sources["fal-kontext"], tmp_path / "out.safetensors"
    expected = deltas(source, "fal")
    assert len(expected) == len(DIT.named_paths(CANONICAL))  # linear1 -> q, k, v, proj_mlp; qkv -> q, k, v
    report = loraformats.convert(source, "diffusers", output, source_format="fal-kontext")
    assert report.source_format == "fal-kontext"
    assert len(ranks(output)) == len(expected)
    assert_same_deltas(deltas(output, "diffusers"), expected)


# --- 5. BFL control ----------------------------------------------------------------------------

CONTROL_PARTS = {
    "norm scale": ("double_blocks.0.img_attn.norm.query_norm.scale", (16,), "not a LoRA delta"),
    "bias delta": ("double_blocks.0.img_attn.qkv.lora_B.bias", (96,), "bias deltas"),
}


@pytest.mark.parametrize("part", CONTROL_PARTS)
def test_bfl_control_parts_that_are_not_deltas_are_refused(tmp_path, capsys, part):
    name, shape, why = CONTROL_PARTS[part]
    source = write_original(tmp_path / "control.safetensors", "", extra={name: torch.ones(shape)})
    with unreadable_data():
        assert loraformats.detect(source).format == "bfl-control"
    output = tmp_path / "out.safetensors"
    code, _ = expect_refusal(capsys, ["convert", str(source), "--to", "kohya", "-o", str(output)], why, name)
    assert code == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.safetensors"]


def test_clean_bfl_control_file_converts(sources, tmp_path):
    source, output = sources["bfl-control"], tmp_path / "out.safetensors"
    expected = deltas(source, "bfl")
    loraformats.convert(source, "kohya", output, source_format="bfl-control")
    assert len(ranks(output)) == len(DIT.named_paths("bfl"))
    assert_same_deltas(deltas(output, "kohya"), expected)


# --- ComfyUI (reader: both factor spellings, both text encoders) ------------------------------


def test_comfyui_to_kohya_and_back(sources, tmp_path):
    source = sources["comfyui"]
    expected = deltas(source, "comfyui")
    kohya, back = tmp_path / "k.safetensors", tmp_path / "c.safetensors"
    loraformats.convert(source, "kohya", kohya)
    assert sum(stem.startswith("lora_te3_") for stem in ranks(kohya)) == len(T5_PATHS)
    assert_same_deltas(deltas(kohya, "kohya"), expected)
    loraformats.convert(kohya, "comfyui", back)
    with unreadable_data():
        assert loraformats.detect(back).format == "comfyui"
    assert set(ranks(back)) == set(ranks(source))
    assert_same_deltas(deltas(back, "comfyui"), expected)


# --- 6. ai-toolkit -----------------------------------------------------------------------------


def test_ai_toolkit_round_trip_is_bitwise_stable(sources, tmp_path):
    """kohya (alpha/rank 0.75, bf16) -> ai-toolkit -> kohya -> ai-toolkit: the two ai-toolkit files hold the
    same tensors bit for bit; the scale is folded (float32), no alpha tensors."""
    first = sources["ai-toolkit"]
    kohya, second = tmp_path / "k.safetensors", tmp_path / "a.safetensors"
    loraformats.convert(first, "kohya", kohya)
    loraformats.convert(kohya, "ai-toolkit", second)
    for path in (first, second):
        tensors = load_file(path)
        assert not any(key.endswith("alpha") for key in tensors)
        assert json.loads(metadata(path)["software"])["name"] == "ai-toolkit"
        with unreadable_data():
            assert loraformats.detect(path).format == "ai-toolkit"
    a, b = load_file(first), load_file(second)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(
            a[key].view(torch.uint8), b[key].view(torch.uint8)
        ), key
    expected = {k: d for k, d in deltas(sources["kohya"], "kohya").items() if k[0] != "text_encoder_2"}
    assert_same_deltas(deltas(first, "diffusers"), expected, rtol=1e-6)  # alpha folded in float32


def test_ai_toolkit_drops_t5_like_diffusers(sources, tmp_path, capsys):
    output = tmp_path / "out.safetensors"
    code, _ = expect_refusal(
        capsys, ["convert", str(sources["kohya"]), "--to", "ai-toolkit", "-o", str(output)], "text_encoder_2"
    )
    assert code == 4 and not output.exists()


def test_diffusers_file_to_ai_toolkit_and_back(sources, tmp_path):
    source = sources["diffusers"]
    expected = deltas(source, "diffusers")
    aitk, back = tmp_path / "a.safetensors", tmp_path / "d.safetensors"
    loraformats.convert(source, "ai-toolkit", aitk)
    loraformats.convert(aitk, "diffusers", back)
    with unreadable_data():
        assert [loraformats.detect(p).format for p in (aitk, back)] == ["ai-toolkit", "diffusers"]
    assert "software" not in metadata(back)
    a, s = load_file(aitk), load_file(source)
    assert sorted(a) == sorted(s) and all(torch.equal(a[k], s[k]) for k in s)
    assert_same_deltas(deltas(aitk, "diffusers"), expected)
    assert_same_deltas(deltas(back, "diffusers"), expected)
    # members with their own downs fuse block-diagonally in Kohya and split back at the summed rank
    # (documented in docs/flux.md): same ΔW, bitwise equal only outside the fused groups
    kohya, again = tmp_path / "k.safetensors", tmp_path / "a2.safetensors"
    loraformats.convert(aitk, "kohya", kohya)
    loraformats.convert(kohya, "ai-toolkit", again)
    assert_same_deltas(deltas(again, "diffusers"), expected)
    b = load_file(again)
    members = {m for group in DIT.groups.values() for m in group}
    alone = [
        k for k in a if k.startswith("transformer.") and k.split(".", 1)[1].rsplit(".", 2)[0] not in members
    ]
    assert len(alone) == 2 * (len(DIT.named_paths(CANONICAL)) - len(members))
    assert all(torch.equal(a[k], b[k]) for k in alone)


@pytest.mark.parametrize("target", ["xlabs", "onetrainer", "fal-kontext", "bfl-control"])
def test_read_only_dialects_are_refused_as_targets(sources, tmp_path, capsys, target):
    output = tmp_path / "out.safetensors"
    args = ["convert", str(sources["kohya"]), "--to", target, "-o", str(output)]
    code, _ = expect_refusal(capsys, args, f"{target} is read-only")
    assert code == 2 and not output.exists()


# --- 7. Hostile inputs -------------------------------------------------------------------------


def hostile_xlabs(tensors: dict) -> None:
    generator = torch.Generator().manual_seed(7)
    lora(
        tensors,
        "double_blocks.0.processor.proj_lora1",
        DIT.modules["transformer_blocks.0.attn.to_out.0"],
        4,
        generator,
        ("down", "up"),
    )
    tensors["double_blocks.0.processor.qkv_lora1.down.weight"] = torch.randn(4, 32, generator=generator)
    tensors["double_blocks.0.processor.qkv_lora1.up.weight"] = torch.randn(97, 4, generator=generator)


def twice_xlabs(tensors: dict) -> None:
    """One factor spelled with and without the `diffusion_model.` prefix: neither may win silently."""
    hostile_xlabs(tensors)
    del tensors["double_blocks.0.processor.qkv_lora1.up.weight"]  # keep only the well-shaped module
    del tensors["double_blocks.0.processor.qkv_lora1.down.weight"]
    name = "double_blocks.0.processor.proj_lora1.down.weight"
    tensors[f"diffusion_model.{name}"] = tensors[name].clone()


def hostile_comfyui(tensors: dict) -> None:
    generator = torch.Generator().manual_seed(8)
    lora(
        tensors,
        "diffusion_model.double_blocks.0.img_attn.proj",
        DIT.modules["transformer_blocks.0.attn.to_out.0"],
        2,
        generator,
        alpha=1.0,
    )
    clip = FLUX.components["text_encoder"].modules[CLIP_PATHS[0]]
    lora(tensors, f"text_encoders.nope.transformer.{CLIP_PATHS[0]}", clip, 2, generator, alpha=1.0)


def hostile_onetrainer(tensors: dict) -> None:
    generator = torch.Generator().manual_seed(9)
    layer = DIT.modules["transformer_blocks.0.attn.to_q"]
    lora(tensors, "lora_transformer_transformer_blocks_0_attn_to_q", layer, 2, generator, alpha=1.0)
    lora(tensors, "lora_transformer_not_a_module", layer, 2, generator, alpha=1.0)


HOSTILE = {
    "xlabs up of the wrong shape": (hostile_xlabs, "xlabs", "double_blocks.0.processor.qkv_lora1"),
    "xlabs factor given twice": (twice_xlabs, "xlabs", "a second down factor for double_blocks.0"),
    "comfyui unknown encoder": (hostile_comfyui, "comfyui", "text_encoders.nope"),
    "onetrainer unknown module": (hostile_onetrainer, "onetrainer", "lora_transformer_not_a_module"),
}


@pytest.mark.parametrize("case", HOSTILE)
@pytest.mark.parametrize("target", ["kohya", "diffusers"])
def test_hostile_inputs_are_refused_in_one_line(tmp_path, capsys, case, target):
    build, fmt, needle = HOSTILE[case]
    tensors: dict = {}
    build(tensors)
    source = tmp_path / "hostile.safetensors"
    save_file(tensors, source)
    with unreadable_data():
        assert loraformats.detect(source).format == fmt
    output = tmp_path / "out.safetensors"
    expect_refusal(capsys, ["convert", str(source), "--to", target, "-o", str(output)], needle)
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hostile.safetensors"]
