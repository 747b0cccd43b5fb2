"""The lycoris format: detection against kohya, the standalone `lycoris_` prefix, refusals with reasons,
and `ss_network_args` kept and corrected."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loraformats
from loraformats.errors import UnsupportedError
from test_lycoris_files import (  # noqa: F401 (fixtures)
    assert_same_file,
    build,
    lycoris_plugin,
    quiet_lycoris,
    randomise,
)
from test_round_trips import raw_file
from tiny import build_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

WRAPPER_ATTRIBUTES = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX",
                      "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")  # fmt: skip


def make_standalone(path, algo: str = "loha") -> None:
    """What LyCORIS's standalone wrapper (`create_lycoris`, used by SimpleTuner) saves for a UNet."""
    from lycoris.wrapper import LycorisNetwork, create_lycoris

    saved = {
        name: getattr(LycorisNetwork, name) for name in WRAPPER_ATTRIBUTES if hasattr(LycorisNetwork, name)
    }
    try:
        unet = build_pipeline("tiny-sd1").unet
        network = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo=algo, preset="attn-only")
        network.apply_to()
        randomise(network, torch.Generator().manual_seed(1))
        network.save_weights(str(path), None, {"format": "pt"})
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)


def test_detection_names_the_lycoris_format_and_its_algorithms(tmp_path):
    path, _ = build(tmp_path, "loha-tucker")
    result = loraformats.detect(path)
    assert (result.format, result.family) == ("lycoris", "tiny-sd1")
    assert result.algorithms == ["loha"]
    kohya = next(c for c in result.formats if c.name == "kohya")
    assert kohya.score < 1 and any("other than LoRA" in text for text in kohya.against)


def test_plain_locon_files_stay_kohya_files(tmp_path):
    path, _ = build(tmp_path, "locon-tucker")
    result = loraformats.detect(path)
    assert result.format == "kohya"
    lycoris = next(c for c in result.formats if c.name == "lycoris")
    assert lycoris.score < 1


def test_the_standalone_prefix_is_read_and_kept(tmp_path):
    path = tmp_path / "standalone.safetensors"
    make_standalone(path)
    assert all(name.startswith("lycoris_") for name in load_file(str(path)))
    adapters = loraformats.load(path, family="tiny-sd1")
    assert adapters.provenance.format == "lycoris" and {c for c, _ in adapters.modules} == {"unet"}
    back = tmp_path / "back.safetensors"
    report = loraformats.convert(path, "lycoris", back, family="tiny-sd1")
    assert report.exactness == "identical"
    assert_same_file(path, back)
    kohya_style = tmp_path / "kohya_style.safetensors"
    loraformats.convert(path, "lycoris", kohya_style, family="tiny-sd1", options={"prefix": "lora_unet"})
    assert all(name.startswith("lora_unet_") for name in load_file(str(kohya_style)))
    assert loraformats.verify(path, kohya_style, family="tiny-sd1").ok


def test_t_lora_modules_are_refused_with_the_reason(tmp_path):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{stem}.q_layer.weight": torch.randn(4, 32), f"{stem}.p_layer.weight": torch.randn(32, 4),
               f"{stem}.lambda_layer": torch.randn(1, 4), f"{stem}.alpha": torch.tensor(4.0)}  # fmt: skip
    path = tmp_path / "tlora.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UnsupportedError, match="T-LoRA modules are refused: their change depends on the"):
        loraformats.convert(path, "lycoris", tmp_path / "out.safetensors", family="tiny-sd1")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"bundle_emb.style.string_to_param.*": torch.zeros(1, 32)}, "bundle_emb"),
        (
            {"lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)},
            "mixes or lacks algorithm keys \\(LoHa, LoRA/LoCon\\)",
        ),
        ({"lora_unet_conv_in.bias_indices": torch.zeros(2, 3, dtype=torch.int16)}, "sparse residual"),
        ({"lora_unet_conv_in.lokr_t1": torch.zeros(2, 2, 3, 3)}, "lokr_t1"),
    ],
    ids=["bundled-embedding", "mixed-module", "sparse-residual", "lokr_t1"],
)
def test_what_cannot_be_converted_is_named(tmp_path, extra, needle):
    path, _ = build(tmp_path, "loha")
    tensors = load_file(str(path)) | extra
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited))
    with pytest.raises(UnsupportedError, match=needle):
        loraformats.convert(edited, "lycoris", tmp_path / "out.safetensors", family="tiny-sd1")


def test_network_args_are_corrected_where_the_file_written_contradicts_them(tmp_path):
    path, _ = build(tmp_path, "loha-dora-input")
    before = json.loads(raw_file(path)[1]["ss_network_args"])
    assert before["algo"] == "loha" and before["dora_wd"] == "True"
    output = tmp_path / "compressed.safetensors"
    loraformats.convert(path, "lycoris", output, family="tiny-sd1", rank=2)  # LoHa -> LoRA, DoRA kept
    after = json.loads(raw_file(output)[1]["ss_network_args"])
    assert after == {**before, "algo": "locon"}
    unchanged = tmp_path / "same.safetensors"
    loraformats.convert(path, "lycoris", unchanged, family="tiny-sd1")
    assert raw_file(unchanged)[1]["ss_network_args"] == raw_file(path)[1]["ss_network_args"]


def test_the_lycoris_hash_is_what_lycoris_computes_for_the_tensors_written(tmp_path):
    """A file whose tensors changed gets the hash LyCORIS's save_weights would give those tensors."""
    from lycoris.utils import precalculate_safetensors_hashes

    path, network = build(tmp_path, "lokr-factor-2")
    assert raw_file(path)[1]["sshs_model_hash"] == precalculate_safetensors_hashes(network.state_dict())
    output = tmp_path / "lora.safetensors"
    loraformats.convert(path, "lycoris", output, family="tiny-sd1", rank=2)
    tensors = load_file(str(output))
    # LyCORIS's order: text encoder modules, then the UNet's, each as LoConModule.custom_state_dict
    order = [lora.lora_name for lora in network.loras]
    state = {}
    for stem in order:
        for suffix in ("alpha", "lora_up.weight", "lora_down.weight"):
            if f"{stem}.{suffix}" in tensors:
                state[f"{stem}.{suffix}"] = tensors[f"{stem}.{suffix}"]
    assert len(state) == len(tensors)
    assert raw_file(output)[1]["sshs_model_hash"] == precalculate_safetensors_hashes(state)
