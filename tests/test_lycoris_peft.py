"""Issue acceptance (3): LoHa and LoKr written for PEFT load in PEFT's own loader and merge exactly.

LyCORIS files (made by LyCORIS, see test_lycoris_files.py) are converted to PEFT directories (one per
component, `LoHaConfig` / `LoKrConfig`). Each component is loaded with `PeftModel.from_pretrained` into
a fresh tiny model (every tensor of the file must land in a PEFT parameter, nothing missing), merged
with `merge_and_unload`, and W' - W of every module is compared with LyCORIS's forward-pass change.
What PEFT cannot hold is refused with the reason. PEFT directories read back give the same file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loraformats
from lora_factory import changed, relative_errors, worst
from loraformats.errors import UnsupportedError
from test_lycoris_files import (  # noqa: F401 (fixtures)
    assert_same_file,
    build,
    lycoris_changes,
    lycoris_plugin,
    module_keys,
    quiet_lycoris,
)
from tiny import build_pipeline, tiny_family

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

LIMIT = 1e-5
Key = tuple[str, str]


def canonical(name: str, model: torch.nn.Module, path: str) -> str:
    return f"text_model.{path}" if name != "unet" and not hasattr(model, "text_model") else path


def apply_with_peft(output: Path, family_name: str = "tiny-sd1") -> tuple[dict[Key, torch.Tensor], int]:
    """Every component directory loaded by PEFT into a fresh fp32 model and merged: (W' - W, modules)."""
    from peft import PeftModel
    from peft.tuners.lycoris_utils import LycorisLayer

    pipe = build_pipeline(family_name)
    changes: dict[Key, torch.Tensor] = {}
    adapted = 0
    for name in tiny_family(family_name).components:
        directory = output / name
        if not directory.is_dir():
            continue
        model = getattr(pipe, name)
        base = {path: module.weight.detach().to(torch.float64) for path, module in model.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(model, str(directory))
        complaints = [str(w.message) for w in caught if "key" in str(w.message).lower()]
        assert not complaints, complaints
        stored = load_file(directory / "adapter_model.safetensors")
        loaded = {}
        for path, module in peft_model.named_modules():
            if isinstance(module, LycorisLayer):
                adapted += 1
                for role in module.adapter_layer_names:
                    parameters = getattr(module, role)
                    if "default" in parameters:
                        loaded[f"{path}.{role}"] = parameters["default"]
        assert sorted(loaded) == sorted(stored), "PEFT's parameters are not exactly the file's tensors"
        for key, tensor in stored.items():
            assert torch.equal(loaded[key].detach(), tensor), key
        merged = peft_model.merge_and_unload()
        for path, module in merged.named_modules():
            if path in base:
                change = module.weight.detach().to(torch.float64) - base[path]
                changes[(name, canonical(name, merged, path))] = change
    return changes, adapted


CASES = ["loha", "lokr-factor-2", "lokr-decompose-both", "lokr-full-matrix", "loha-tucker", "lokr-tucker"]


@pytest.mark.parametrize("case", CASES)
def test_loha_and_lokr_merge_in_peft_as_their_forward_pass(tmp_path, case):
    path, network = build(tmp_path, case)
    output = tmp_path / "peft"
    report = loraformats.convert(path, "peft", output, family="tiny-sd1")
    assert report.exactness == "identical", report.steps
    keys = module_keys(path, "tiny-sd1")
    expected = {keys[stem]: change for stem, change in lycoris_changes(network).items()}
    config = json.loads((output / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LOHA" if case.startswith("loha") else "LOKR")

    changes, adapted = apply_with_peft(output)

    assert adapted == len(expected)
    assert changed(changes) == set(expected)
    assert not worst(relative_errors(expected, changes), LIMIT)


@pytest.mark.parametrize("case", ["loha", "lokr-factor-2", "lokr-full-matrix", "lokr-decompose-both"])
def test_lycoris_to_peft_to_lycoris_is_an_identity(tmp_path, case):
    """The alpha tensors (and LoKr's scale rule) travel in `loraformats.alphas`; the file comes back."""
    path, _ = build(tmp_path, case)
    middle, back = tmp_path / "peft", tmp_path / "back.safetensors"
    loraformats.convert(path, "peft", middle, family="tiny-sd1")
    again = loraformats.convert(middle, "lycoris", back, family="tiny-sd1")
    assert again.exactness == "identical", again.steps
    assert_same_file(path, back)


def test_a_peft_lokr_with_full_factors_keeps_its_alpha_over_r(tmp_path):
    """PEFT scales two full LoKr factors by alpha / r (LyCORIS by 1): the scale is carried, and folded into
    lokr_w1 (rounded) for LyCORIS, whose loaders would apply 1."""
    from peft import LoKrConfig, get_peft_model

    model = build_pipeline("tiny-sd1").unet
    config = LoKrConfig(r=16, alpha=4, target_modules=["to_q", "to_k"], init_weights=False)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lokr_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    source = tmp_path / "source" / "unet"
    peft_model.save_pretrained(str(source))
    stored = load_file(source / "adapter_model.safetensors")
    assert any(k.endswith("lokr_w2") for k in stored) and not any(k.endswith("lokr_w2_a") for k in stored)

    adapters = loraformats.load(source.parent, family="tiny-sd1")
    assert {m.convention for m in adapters.modules.values()} == {"peft"}
    assert {m.scale for m in adapters.modules.values()} == {0.25}

    lycoris = tmp_path / "lycoris.safetensors"
    report = loraformats.convert(source.parent, "lycoris", lycoris, family="tiny-sd1")
    assert "bake-lokr-scale" in [step.name for step in report.steps]
    verify = loraformats.verify(source.parent, lycoris, family="tiny-sd1")
    assert verify.ok, verify

    back = tmp_path / "peft"
    loraformats.convert(source.parent, "peft", back, family="tiny-sd1")
    changes, adapted = apply_with_peft(back)
    expected, _ = apply_with_peft(source.parent)
    assert adapted == len(stored) // 2
    assert not worst(relative_errors(expected, changes), 1e-12)


REFUSALS = {
    "lokr-factor": "none gives these",  # LyCORIS's factor 4 on 4 channels is (1, 4); PEFT's is (4, 1)
    "diag-oft": "peft cannot hold diag-oft",
    "boft": "peft cannot hold boft",
    "ia3-output": "peft cannot hold ia3",
    "full": "peft cannot hold full.bias",
    "loha-dora-input": "peft cannot hold dora.input",
    "locon-norm": "peft cannot hold norm",
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_peft_cannot_hold_is_refused_with_the_reason(tmp_path, case):
    path, _ = build(tmp_path, case)
    output = tmp_path / "peft"
    with pytest.raises(UnsupportedError, match=REFUSALS[case]):
        loraformats.convert(path, "peft", output, family="tiny-sd1")
    assert not output.exists()


def test_a_component_mixing_loha_and_lokr_is_refused_for_peft(tmp_path):
    from safetensors.torch import save_file

    loha, _ = build(tmp_path, "loha")
    lokr, _ = build(tmp_path, "lokr-factor-2")
    tensors = load_file(str(loha))
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    for name in [k for k in tensors if k.startswith(stem + ".")]:
        del tensors[name]
    tensors |= {k: v for k, v in load_file(str(lokr)).items() if k.startswith(stem + ".")}
    mixed = tmp_path / "mixed.safetensors"
    save_file(tensors, str(mixed))
    with pytest.raises(UnsupportedError, match="one tuner type"):
        loraformats.convert(mixed, "peft", tmp_path / "peft", family="tiny-sd1")


def save_peft_tuner(directory: Path, config, seed: int = 0) -> Path:
    """A tiny UNet adapted by `peft` with `config`, every adapter tensor random, saved by PEFT."""
    from peft import get_peft_model

    peft_model = get_peft_model(build_pipeline("tiny-sd1").unet, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if any(part in name for part in ("hada_", "lokr_", "oft_", "boft_")):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    peft_model.save_pretrained(str(directory / "unet"))
    return directory


def test_a_loha_saved_by_peft_reads_and_comes_back_for_peft(tmp_path):
    from peft import LoHaConfig

    config = LoHaConfig(r=4, alpha=6, target_modules=["to_q", "to_k", "conv1", "proj_in"], init_weights=False)
    source = save_peft_tuner(tmp_path / "source", config)
    expected, adapted = apply_with_peft(source)
    lycoris = tmp_path / "loha.safetensors"
    report = loraformats.convert(source, "lycoris", lycoris, family="tiny-sd1")
    assert report.exactness == "identical"
    assert loraformats.verify(source, lycoris, family="tiny-sd1").ok
    back = tmp_path / "back"
    loraformats.convert(lycoris, "peft", back, family="tiny-sd1")
    changes, count = apply_with_peft(back)
    assert count == adapted and changed(changes) == changed(expected)
    assert not worst(relative_errors({k: expected[k] for k in changed(expected)}, changes), 1e-12)
    stored, copied = (
        load_file(source / "unet" / "adapter_model.safetensors"),
        load_file(back / "unet" / "adapter_model.safetensors"),
    )
    assert stored.keys() == copied.keys() and all(torch.equal(stored[k], copied[k]) for k in stored)


@pytest.mark.parametrize("tuner", ["OFT", "BOFT"])
def test_peft_oft_and_boft_are_refused_because_their_maths_differ(tmp_path, tuner):
    import peft

    if tuner == "OFT":
        config = peft.OFTConfig(oft_block_size=4, target_modules=["to_q"], init_weights=False)
    else:
        config = peft.BOFTConfig(boft_block_size=4, target_modules=["to_q"], init_weights=False)
    source = save_peft_tuner(tmp_path / "source", config)
    with pytest.raises(UnsupportedError, match=f"PEFT {tuner} is refused: .* the maths disagree"):
        loraformats.convert(source, "lycoris", tmp_path / "out.safetensors", family="tiny-sd1")
