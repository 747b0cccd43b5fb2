"""PEFT adapter directories: round trips, detection and refusals (header- and file-level).

Sources are saved by `peft` itself (see test_consumer_peft.py, which applies the conversions in real
models). Effective scales are computed from each `adapter_config.json` with PEFT's own rules:
`LoraConfig.from_pretrained`, `get_pattern_key` on `rank_pattern` / `alpha_pattern`, and
alpha / r (alpha / sqrt(r) with `use_rslora`), as `LoraLayer.update_layer` computes `scaling`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loraformats
from lora_factory import kohya_stems, make_kohya
from loraformats.cli import main
from test_consumer_peft import COMPONENTS, VARIANTS, add_dora_scale, save_layout, save_peft
from test_round_trips import assert_same_file, raw_file, write_kohya_source
from tiny import tiny_family

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # the tiny pipelines' scheduler config

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """(family, variant) -> a per-component layout saved by PEFT, built once per module."""
    cache: dict[tuple[str, str], Path] = {}

    def get(family_name: str, variant: str) -> Path:
        if (family_name, variant) not in cache:
            root = tmp_path_factory.mktemp(f"{family_name}-{variant}") / "lora"
            cache[(family_name, variant)] = save_layout(root, family_name, variant, seed=7)
        return cache[(family_name, variant)]

    return get


# ------------------------------------------------------------------------------------------ helpers


def adapter_dirs(root: Path) -> dict[str, Path]:
    """component -> adapter directory of a per-component layout."""
    return {child.name: child for child in sorted(root.iterdir()) if (child / CONFIG).is_file()}


def peft_tensors(root: Path) -> dict[tuple[str, str], dict[str, tuple[str, list[int], bytes]]]:
    """(component, module) -> {role suffix: (dtype, shape, bytes)}, straight from the safetensors layout."""
    modules: dict[tuple[str, str], dict] = {}
    for component, directory in adapter_dirs(root).items():
        tensors, _ = raw_file(directory / WEIGHTS)
        for name, value in tensors.items():
            for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"):
                if name.endswith(suffix):
                    module = name.removeprefix(PREFIX).removesuffix(suffix)
                    modules.setdefault((component, module), {})[suffix] = value
                    break
            else:
                raise AssertionError(f"{component}: unexpected tensor {name}")
    return modules


def peft_scales(directory: Path) -> dict[str, float]:
    """module -> effective scale, from the config as PEFT reads it; the config's rank must be the file's."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    config = LoraConfig.from_pretrained(str(directory))
    scales = {}
    for name, tensor in load_file(directory / WEIGHTS).items():
        if not name.endswith(".lora_A.weight"):
            continue
        module = name.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
        )
        assert r == tensor.shape[0], (
            f"{directory.name}: config rank {r} for {module}, tensors {tensor.shape[0]}"
        )
        scales[module] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return scales


def layout_scales(root: Path) -> dict[tuple[str, str], float]:
    return {
        (component, module): scale
        for component, directory in adapter_dirs(root).items()
        for module, scale in peft_scales(directory).items()
    }


def kohya_scales(path: Path, family_name: str) -> dict[tuple[str, str], float]:
    """(component, canonical path) -> alpha / r of a Kohya file (alpha absent or 0: alpha = r)."""
    stems = kohya_stems(tiny_family(family_name))
    tensors = load_file(path)
    scales = {}
    for name, down in tensors.items():
        if name.endswith(".lora_down.weight"):
            stem = name.removesuffix(".lora_down.weight")
            r = down.shape[0]
            alpha = float(tensors[f"{stem}.alpha"]) if f"{stem}.alpha" in tensors else 0.0
            scales[stems[stem]] = (alpha or r) / r
    return scales


def canonical_scales(root: Path) -> dict[tuple[str, str], float]:
    """layout_scales keyed by canonical path (transformers-5 `CLIPTextModel` names lack `text_model.`)."""
    scales = {}
    for (component, module), scale in layout_scales(root).items():
        flattened = component != "unet" and not module.startswith("text_model.")
        scales[(component, f"text_model.{module}" if flattened else module)] = scale
    return scales


def within_one_fp32_ulp(a: float, b: float) -> bool:
    return abs(a - b) <= float(np.spacing(np.float32(max(abs(a), abs(b)))))


def assert_same_scales(expected: dict, actual: dict, *, ulp: bool) -> None:
    assert sorted(actual) == sorted(expected)
    if ulp:
        off = {key: (expected[key], actual[key]) for key in expected
               if not within_one_fp32_ulp(expected[key], actual[key])}  # fmt: skip
    else:
        off = {key: (expected[key], actual[key]) for key in expected if expected[key] != actual[key]}
    assert not off, list(off.items())[:5]


# ------------------------------------------------------------------------------ 3. round trips

ROUND_TRIP_LAYOUTS = [
    *(pytest.param("tiny-sdxl", variant, id=f"sdxl-{variant}") for variant in VARIANTS),
    pytest.param("tiny-sd1", "patterns", id="sd1-patterns"),
]


@pytest.mark.parametrize(("family_name", "variant"), ROUND_TRIP_LAYOUTS)
def test_peft_to_kohya_to_peft_gives_back_every_tensor_and_scale(tmp_path, layouts, family_name, variant):
    """Same tensor names, dtypes, shapes and bytes per module; the same effective scale per module
    (exactly, or within one fp32 ulp where rsLoRA makes it irrational and Kohya stores alpha in fp32)."""
    source = layouts(family_name, variant)
    middle, back = tmp_path / "kohya.safetensors", tmp_path / "back"
    loraformats.convert(source, "kohya", middle, family=family_name)
    loraformats.convert(middle, "peft", back, family=family_name)

    assert sorted(adapter_dirs(back)) == sorted(COMPONENTS[family_name])
    ours, theirs = peft_tensors(source), peft_tensors(back)
    assert sorted(theirs) == sorted(ours)
    different = [key for key in ours if theirs[key] != ours[key]]
    assert not different, different[:5]
    rslora = variant == "rslora"
    assert_same_scales(layout_scales(source), layout_scales(back), ulp=rslora)
    assert_same_scales(canonical_scales(source), kohya_scales(middle, family_name), ulp=rslora)
    if rslora:  # the case is real: some scales are irrational
        assert any(
            not float(s).is_integer() and not (2 * s).is_integer() for s in layout_scales(source).values()
        )


def test_peft_to_peft_rewrites_the_config_but_not_the_scales(tmp_path, layouts):
    """Config values may be re-expressed (most common r / lora_alpha, escaped exact-name patterns); PEFT's
    reading of them gives every module the same rank and scale."""
    source = layouts("tiny-sdxl", "patterns")
    back = tmp_path / "peft"
    loraformats.convert(source, "peft", back, family="tiny-sdxl")

    assert peft_tensors(back) == peft_tensors(source)
    assert_same_scales(layout_scales(source), layout_scales(back), ulp=False)
    for component, directory in adapter_dirs(back).items():
        config = json.loads((directory / CONFIG).read_text())
        assert config["peft_type"] == "LORA" and config["use_rslora"] is False, component
        assert all("\\." in key for key in (*config["rank_pattern"], *config["alpha_pattern"])), component


KOHYA_ROUND_TRIPS = [
    pytest.param(
        "tiny-sd1", "canonical", torch.float16, "mixed", (4, 2, 8), id="sd1-fp16-some-alphas-absent"
    ),
    pytest.param("tiny-sd2", "canonical", torch.float32, "varied", 4, id="sd2-fp32-varied"),
    pytest.param("tiny-sdxl", "ldm", torch.bfloat16, "nonpow2", (4, 8), id="sdxl-ldm-bf16-nonpow2"),
    pytest.param(
        "tiny-sdxl",
        "canonical",
        torch.float16,
        "none",
        4,
        id="sdxl-canonical-fp16-no-alpha",
    ),
]


@pytest.mark.parametrize(("family_name", "naming", "dtype", "alpha", "rank"), KOHYA_ROUND_TRIPS)
def test_kohya_to_peft_to_kohya_is_bit_identical(tmp_path, family_name, naming, dtype, alpha, rank):
    """Same names (the source's naming), bytes and sd-scripts metadata; the PEFT middle states each
    module's scale exactly."""
    source, middle, back = tmp_path / "kohya.safetensors", tmp_path / "peft", tmp_path / "back.safetensors"
    write_kohya_source(source, family_name, naming=naming, dtype=dtype, alpha=alpha, rank=rank, tucker=False)
    loraformats.convert(source, "peft", middle, family=family_name)
    loraformats.convert(middle, "kohya", back, family=family_name)

    assert_same_file(source, back)
    assert_same_scales(kohya_scales(source, family_name), canonical_scales(middle), ulp=False)


def test_kohya_dora_to_peft_to_kohya_is_bit_identical(tmp_path):
    """Output-axis `dora_scale` (out, 1[, 1, 1]) <-> `lora_magnitude_vector` (out,) / (1, out, 1, 1)."""
    source, middle, back = tmp_path / "kohya.safetensors", tmp_path / "peft", tmp_path / "back.safetensors"
    make_kohya(source, "tiny-sd1", dtype=torch.float16, rank=(4, 8), alpha="varied", tucker=False, seed=8)
    add_dora_scale(source, "tiny-sd1", "output", seed=8)
    loraformats.convert(source, "peft", middle, family="tiny-sd1")
    loraformats.convert(middle, "kohya", back, family="tiny-sd1")

    assert_same_file(source, back)
    for directory in adapter_dirs(middle).values():
        assert json.loads((directory / CONFIG).read_text())["use_dora"] is True
        shapes = {tuple(t.shape) for n, t in load_file(directory / WEIGHTS).items() if "magnitude" in n}
        assert all(len(shape) == 1 or (len(shape) == 4 and shape[0] == 1) for shape in shapes), shapes


def test_patterns_match_only_the_names_peft_sees(tmp_path):
    """A `CLIPTextModel` adapter (names without `text_model.`) whose alpha_pattern key spells the module
    with `text_model.`: PEFT ignores the key (it warns), so the converted scale must ignore it too."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from tiny import build_pipeline

    key = r"text_model\.encoder\.layers\.0\.self_attn\.v_proj"
    with pytest.warns(RuntimeWarning, match="did not match"):
        source = save_peft(tmp_path / "te", "tiny-sd1", "text_encoder", alpha_pattern={key: 5})
    output = tmp_path / "kohya.safetensors"
    loraformats.convert(source, "kohya", output, family="tiny-sd1")

    with pytest.warns(RuntimeWarning, match="did not match"):
        model = PeftModel.from_pretrained(build_pipeline("tiny-sd1").text_encoder, str(source))
    theirs = {("text_encoder", f"text_model.{path.removeprefix(PREFIX)}"): module.scaling["default"]
              for path, module in model.named_modules() if isinstance(module, LoraLayer)}  # fmt: skip
    assert_same_scales(theirs, kohya_scales(output, "tiny-sd1"), ulp=False)


def test_an_edited_config_wins_over_the_alphas_an_earlier_conversion_recorded(tmp_path):
    """Kohya -> PEFT, then a person edits adapter_config.json (as PEFT users do): PEFT applies the edited
    scales, so a conversion of the edited directory must carry those, not the recorded Kohya alphas."""
    source, middle, back = tmp_path / "kohya.safetensors", tmp_path / "peft", tmp_path / "back.safetensors"
    make_kohya(source, "tiny-sd1", dtype=torch.float16, alpha="varied", tucker=False, seed=10)
    loraformats.convert(source, "peft", middle, family="tiny-sd1")
    edited_config(middle / "text_encoder", use_rslora=True, lora_alpha=6, alpha_pattern={})
    loraformats.convert(middle, "kohya", back, family="tiny-sd1")

    assert_same_scales(canonical_scales(middle), kohya_scales(back, "tiny-sd1"), ulp=True)


# -------------------------------------------------------------------------------- 4. detection


def test_a_per_component_layout_is_detected_with_reasons(layouts):
    root = layouts("tiny-sdxl", "plain")
    result = loraformats.detect(root)

    assert (result.format, result.family) == ("peft", "tiny-sdxl")
    assert sorted(c.name for c in result.components) == sorted(COMPONENTS["tiny-sdxl"])
    peft = next(candidate for candidate in result.formats if candidate.name == "peft")
    assert (
        peft.score == 1.0 and "PEFT adapter directories: text_encoder, text_encoder_2, unet" in peft.reasons
    )
    assert "every module resolves in tiny-sdxl by name and shape" in result.reasons
    assert result.metadata["unet/adapter_config.json:r"] == "4"
    assert result.metadata["text_encoder_2/adapter_config.json:lora_alpha"] == "6"


@pytest.mark.parametrize("what", ["directory", "weights-with-config", "weights-alone"])
def test_a_single_adapter_is_detected_from_its_directory_or_its_weights(tmp_path, layouts, what):
    """A single adapter directory, its `adapter_model.safetensors`, and that file alone (no config)."""
    adapter = layouts("tiny-sd1", "dora") / "unet"
    if what == "directory":
        source = adapter
    elif what == "weights-with-config":
        source = adapter / WEIGHTS
    else:
        source = tmp_path / WEIGHTS
        shutil.copy(adapter / WEIGHTS, source)
    result = loraformats.detect(source)

    assert (result.format, result.family, result.algorithms) == ("peft", "tiny-sd1", ["dora"])
    assert [c.name for c in result.components] == ["unet"]
    assert result.reasons and result.confidence == 1.0
    peft = next(candidate for candidate in result.formats if candidate.name == "peft")
    if what == "directory":
        assert peft.reasons == ["PEFT adapter directories: ."]
    else:
        assert peft.reasons == [f"{3 * 117} of {3 * 117} tensor names are PEFT keys (base_model.model.)"]
    assert ("unet/adapter_config.json:use_dora" in result.metadata) == (what != "weights-alone")


def test_detect_command_names_the_peft_format(layouts, capsys):
    root = layouts("tiny-sd1", "plain")
    assert main(["detect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "  format: peft\n  family: tiny-sd1\n" in out
    assert main(["detect", str(root / "unet" / WEIGHTS), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["format"], result["family"]) == ("peft", "tiny-sd1")


# -------------------------------------------------------------------------------- 5. refusals


def expect_refusal(capsys, tmp_path: Path, source: Path, target: str, family_name: str, *needles: str):
    """Exit 4, one line on stderr naming the reason, and nothing written (no output, no leftovers)."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()  # what building the source printed
    output = tmp_path / f"out.{target}"
    code = main(["convert", str(source), "--to", target, "-o", str(output), "--family", family_name])
    err = capsys.readouterr().err
    assert code == 4, err
    assert len(err.strip().splitlines()) == 1, err
    assert all(needle in err for needle in needles), err
    assert not output.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def edited_config(directory: Path, **changes) -> Path:
    config = json.loads((directory / CONFIG).read_text())
    (directory / CONFIG).write_text(json.dumps({**config, **changes}))
    return directory


TARGETS = ["kohya", "diffusers", "peft"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_rewriting_initialisations_saved_by_peft_are_refused(tmp_path, capsys, init, target):
    source = save_peft(tmp_path / "adapter", "tiny-sd1", "text_encoder", init_lora_weights=init)
    expect_refusal(
        capsys, tmp_path, source, target, "tiny-sd1", f"init_lora_weights={init!r}", "base weights"
    )


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "loftq", "lora_ga"])
def test_other_base_rewriting_initialisations_are_refused(tmp_path, capsys, layouts, init):
    source = tmp_path / "lora"
    shutil.copytree(layouts("tiny-sd1", "plain"), source)
    edited_config(source / "unet", init_lora_weights=init)
    expect_refusal(capsys, tmp_path, source, "kohya", "tiny-sd1", f"init_lora_weights={init!r}")


@pytest.mark.parametrize("target", TARGETS)
def test_modules_to_save_with_full_weights_is_refused(tmp_path, capsys, target):
    source = save_peft(tmp_path / "adapter", "tiny-sd1", "unet", modules_to_save=["conv_in"])
    assert f"{PREFIX}conv_in.weight" in load_file(source / WEIGHTS)  # PEFT saved the full weights
    expect_refusal(capsys, tmp_path, source, target, "tiny-sd1")


def test_the_modules_to_save_refusal_names_modules_to_save(tmp_path, capsys):
    source = save_peft(tmp_path / "adapter", "tiny-sd1", "unet", modules_to_save=["conv_in"])
    expect_refusal(capsys, tmp_path, source, "kohya", "tiny-sd1", "modules_to_save", "not an adapter delta")


@pytest.mark.filterwarnings("ignore:Adapter 'default'")  # PEFT takes 1-D lora_B.bias for a sharded save
@pytest.mark.parametrize("target", TARGETS)
def test_lora_bias_is_refused(tmp_path, capsys, target):
    source = save_peft(tmp_path / "adapter", "tiny-sd1", "text_encoder", lora_bias=True)
    assert any(name.endswith(".lora_B.bias") for name in load_file(source / WEIGHTS))
    expect_refusal(
        capsys, tmp_path, source, target, "tiny-sd1", "LoRA bias (lora_B.bias) is not supported yet"
    )


def test_use_dora_without_magnitude_vectors_is_refused(tmp_path, capsys, layouts):
    source = tmp_path / "adapter"
    shutil.copytree(layouts("tiny-sd1", "dora") / "text_encoder", source)
    tensors = load_file(source / WEIGHTS)
    save_file({name: t for name, t in tensors.items() if "magnitude" not in name}, source / WEIGHTS)
    expect_refusal(capsys, tmp_path, source, "kohya", "tiny-sd1", "use_dora without lora_magnitude_vector")


def kohya_with_dora(path: Path, axis: str, components=None) -> Path:
    make_kohya(path, "tiny-sd1", dtype=torch.float32, tucker=False, alpha="varied", seed=9)
    add_dora_scale(path, "tiny-sd1", axis, components, seed=9)
    return path


def test_input_axis_kohya_dora_is_refused_for_peft(tmp_path, capsys):
    """Older LyCORIS normalises input columns, `dora_scale` (1, in[, 1, 1]); PEFT has only the output axis."""
    source = kohya_with_dora(tmp_path / "kohya.safetensors", "input")
    expect_refusal(capsys, tmp_path, source, "peft", "tiny-sd1", "peft cannot hold dora.input")


def test_a_component_mixing_dora_and_plain_lora_is_refused_for_peft(tmp_path, capsys):
    """`use_dora` covers a component: DoRA on some UNet modules only cannot be one LoraConfig."""
    source = kohya_with_dora(tmp_path / "kohya.safetensors", "output", components={"unet"})
    tensors = load_file(source)
    plain = next(name.removesuffix(".dora_scale") for name in tensors if name.endswith(".dora_scale"))
    save_file({name: t for name, t in tensors.items() if name != f"{plain}.dora_scale"}, source)
    expect_refusal(capsys, tmp_path, source, "peft", "tiny-sd1", "unet mixes DoRA and plain LoRA modules")


def test_dora_on_one_component_and_plain_lora_on_another_converts(tmp_path):
    """Each component has its own LoraConfig: a DoRA text encoder beside a plain UNet is fine."""
    source = kohya_with_dora(tmp_path / "kohya.safetensors", "output", components={"text_encoder"})
    output = tmp_path / "peft"
    loraformats.convert(source, "peft", output, family="tiny-sd1")
    configs = {name: json.loads((d / CONFIG).read_text()) for name, d in adapter_dirs(output).items()}
    assert {name: config["use_dora"] for name, config in configs.items()} == {
        "text_encoder": True,
        "unet": False,
    }
