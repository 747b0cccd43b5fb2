"""Issue acceptance 4: kohya → diffusers → kohya and diffusers → kohya → diffusers give back the same file.

"The same" means: the same tensor names, and per tensor the same dtype, shape and bytes; every metadata
entry of the source present with its value (loraformats may add `loraformats.*` entries). Kohya
sources carry realistic sd-scripts metadata, with `sshs_*` hashes computed as sd-scripts does.
Tucker cores cannot be held by diffusers: that round trip is checked for equal changes instead.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import loraformats
from lora_factory import make_diffusers, make_kohya, reference_deltas, relative_errors, worst

F16, F32, BF16 = torch.float16, torch.float32, torch.bfloat16

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # the tiny pipelines' scheduler config

BASE_MODEL = {"tiny-sd1": ("sd_v1", "stable-diffusion-v1/lora", "512x512"),
              "tiny-sd2": ("sd_v2", "stable-diffusion-v2-768-v/lora", "768x768"),
              "tiny-sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "1024x1024")}  # fmt: skip


# ------------------------------------------------------------------------------------------ helpers


def raw_file(path: Path) -> tuple[dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    """{name: (dtype, shape, bytes)} and the metadata, read straight from the safetensors layout."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", {})
    start = 8 + length
    tensors = {
        name: (
            entry["dtype"],
            entry["shape"],
            data[start + entry["data_offsets"][0] : start + entry["data_offsets"][1]],
        )
        for name, entry in header.items()
    }
    return tensors, metadata


def sd_scripts_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes: serialise with the ss_* entries only, then hash."""
    buffer = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    (length,) = struct.unpack("<Q", buffer[:8])
    model = hashlib.sha256(buffer[8 + length :]).hexdigest()
    legacy = hashlib.sha256(buffer[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model, legacy


def training_metadata(family_name: str, rank: int, alpha: str | float) -> dict[str, str]:
    """What sd-scripts' train_network.py writes for a LoRA of this family (values realistic, trimmed)."""
    version, architecture, resolution = BASE_MODEL[family_name]
    metadata = {
        "ss_session_id": "1850946473",
        "ss_training_started_at": "1714557600.5871384",
        "ss_output_name": "tiny_style",
        "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05",
        "ss_unet_lr": "0.0001",
        "ss_num_train_images": "40",
        "ss_max_train_steps": "400",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_args": json.dumps({"conv_dim": str(rank), "conv_alpha": "1"}),
        "ss_mixed_precision": "fp16",
        "ss_base_model_version": version,
        "ss_v2": str(family_name == "tiny-sd2"),
        "ss_resolution": f"({resolution.replace('x', ', ')})",
        "ss_tag_frequency": json.dumps({"10_tiny style": {"tiny style": 40, "café au lait": 3}}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models"
        if family_name == "tiny-sdxl"
        else "diffusers",
        "modelspec.title": "tiny_style",
        "modelspec.resolution": resolution,
        "modelspec.prediction_type": "v" if family_name == "tiny-sd2" else "epsilon",
        "modelspec.date": "2024-05-01T10:20:00",
    }
    if alpha != "none":  # files without alpha tensors predate sd-scripts' network_alpha
        metadata["ss_network_alpha"] = "4.0" if alpha == "rank" else "1.0"
    return metadata


def write_kohya_source(path: Path, family_name: str, **factory) -> dict[str, str]:
    """A Kohya file as sd-scripts saves it: tensors from `make_kohya`, training metadata, sshs_* hashes."""
    make_kohya(path, family_name, **factory)
    tensors = load_file(path)
    rank = factory.get("rank", 4)
    metadata = training_metadata(family_name, rank if isinstance(rank, int) else rank[0], factory["alpha"])
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = sd_scripts_hashes(tensors, metadata)
    save_file(tensors, path, metadata=metadata)
    return metadata


def assert_same_file(source: Path, result: Path) -> None:
    """Same names, dtypes, shapes and bytes; the source's metadata kept; only loraformats.* added."""
    ours, our_metadata = raw_file(source)
    theirs, their_metadata = raw_file(result)
    assert sorted(theirs) == sorted(ours)
    different = [name for name in ours if theirs[name] != ours[name]]
    assert not different, [(name, ours[name][:2], theirs[name][:2]) for name in different[:5]]
    changed = {k: (v, their_metadata.get(k)) for k, v in our_metadata.items() if their_metadata.get(k) != v}
    assert not changed
    assert all(key.startswith("loraformats.") for key in set(their_metadata) - set(our_metadata))


def round_trip(source: Path, via: str, back: str, family_name: str):
    middle, result = (
        source.with_name(f"middle.{via}.safetensors"),
        source.with_name(f"back.{back}.safetensors"),
    )
    first = loraformats.convert(source, via, middle, family=family_name)
    second = loraformats.convert(middle, back, result, family=family_name)
    return result, first, second


# ------------------------------------------------------------------------------ kohya → diffusers → kohya

KOHYA_CASES = [
    pytest.param("tiny-sd1", "canonical", F16, "rank", 4, id="sd1-fp16-alpha=rank"),
    pytest.param("tiny-sd1", "canonical", F32, "pow2", 4, id="sd1-fp32-pow2"),
    pytest.param("tiny-sd1", "canonical", BF16, "nonpow2", 4, id="sd1-bf16-nonpow2"),
    pytest.param("tiny-sd2", "canonical", F16, "none", 4, id="sd2-fp16-no-alpha"),
    pytest.param("tiny-sd2", "canonical", BF16, "pow2", (4, 8), id="sd2-bf16-pow2-ranks4/8"),
    pytest.param("tiny-sd2", "canonical", F32, "varied", 4, id="sd2-fp32-varied"),
    pytest.param("tiny-sdxl", "ldm", F16, "varied", (4, 2, 8), id="sdxl-ldm-fp16-varied-ranks4/2/8"),
    pytest.param("tiny-sdxl", "ldm", BF16, "nonpow2", 4, id="sdxl-ldm-bf16-nonpow2"),
    pytest.param("tiny-sdxl", "ldm", F32, "none", 8, id="sdxl-ldm-fp32-no-alpha"),
    pytest.param("tiny-sdxl", "canonical", F16, "pow2", 4, id="sdxl-canonical-fp16-pow2"),
    pytest.param("tiny-sdxl", "canonical", BF16, "rank", 4, id="sdxl-canonical-bf16-alpha=rank"),
    pytest.param("tiny-sdxl", "canonical", F32, "nonpow2", 8, id="sdxl-canonical-fp32-nonpow2"),
    pytest.param("tiny-sd1", "canonical", F16, "mixed", 4, id="sd1-fp16-some-alphas-absent"),
    pytest.param("tiny-sdxl", "ldm", F16, "mixed", 4, id="sdxl-ldm-fp16-some-alphas-absent"),
]  # fmt: skip


@pytest.mark.parametrize(("family_name", "naming", "dtype", "alpha", "rank"), KOHYA_CASES)
def test_kohya_to_diffusers_to_kohya_is_bit_identical(tmp_path, family_name, naming, dtype, alpha, rank):
    """Factors, alphas (or their absence), the SDXL naming and sd-scripts metadata all come back unchanged."""
    source = tmp_path / "source.safetensors"
    metadata = write_kohya_source(
        source, family_name, naming=naming, dtype=dtype, alpha=alpha, rank=rank, tucker=False, seed=21
    )

    result, first, second = round_trip(source, "diffusers", "kohya", family_name)

    assert_same_file(source, result)
    assert first.exactness in ("identical", "exact") and second.exactness in ("identical", "exact")
    assert sd_scripts_hashes(load_file(result), raw_file(result)[1]) == (
        metadata["sshs_model_hash"],
        metadata["sshs_legacy_hash"],
    )


def test_sshs_legacy_hash_window_survives_the_round_trip(tmp_path):
    """A file past 1 MiB, so sd-scripts' legacy hash covers real tensor bytes, not an empty window."""
    source = tmp_path / "source.safetensors"
    metadata = write_kohya_source(source, "tiny-sdxl", naming="ldm", dtype=F32, alpha="varied", rank=16,
                                  tucker=False, seed=22)  # fmt: skip
    assert source.stat().st_size > 0x100000 + 0x10000
    assert metadata["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]

    result, _, _ = round_trip(source, "diffusers", "kohya", "tiny-sdxl")

    assert_same_file(source, result)


# ------------------------------------------------------------------------------ diffusers → kohya → diffusers

DIFFUSERS_CASES = [
    pytest.param("tiny-sd1", False, F32, ["unet"], id="sd1-unet-fp32"),
    pytest.param("tiny-sd2", False, BF16, ["unet"], id="sd2-unet-bf16"),
    pytest.param("tiny-sdxl", True, F16, ["unet"], id="sdxl-unet-fp16-patterns"),
    pytest.param("tiny-sdxl", True, F32, ["unet", "text_encoder_2"], id="sdxl-unet+te2-fp32-patterns"),
    pytest.param("tiny-sd1", False, F32, None, id="sd1-unet+te-fp32"),
    pytest.param("tiny-sdxl", True, F16, None, id="sdxl-unet+te+te2-fp16-patterns"),
]  # fmt: skip


@pytest.mark.parametrize(("family_name", "patterns", "dtype", "components"), DIFFUSERS_CASES)
def test_diffusers_to_kohya_to_diffusers_is_bit_identical(tmp_path, family_name, patterns, dtype, components):
    """A file saved by diffusers (lora_alpha 8 at r 4, `lora_adapter_metadata`) comes back byte for byte."""
    source, _ = make_diffusers(
        tmp_path / "saved", family_name, patterns=patterns, dtype=dtype, components=components, seed=23
    )
    config = json.loads(raw_file(source)[1]["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] != config["unet.r"]

    result, first, second = round_trip(source, "kohya", "diffusers", family_name)

    assert_same_file(source, result)
    assert first.exactness in ("identical", "exact") and second.exactness in ("identical", "exact")


# ------------------------------------------------------------------------------------------- Tucker


@pytest.mark.parametrize(
    ("family_name", "naming", "dtype"),
    [
        pytest.param("tiny-sd1", "canonical", F16, id="sd1-fp16"),
        pytest.param("tiny-sdxl", "ldm", BF16, id="sdxl-ldm-bf16"),
    ],
)
def test_tucker_round_trip_keeps_every_change_within_fp32_rounding(tmp_path, family_name, naming, dtype):
    """Tucker cores are merged (a reported `rounded` step): same changes, all else byte for byte."""
    source = tmp_path / "source.safetensors"
    metadata = write_kohya_source(
        source, family_name, naming=naming, dtype=dtype, alpha="varied", tucker=True, seed=24
    )

    result, first, _ = round_trip(source, "diffusers", "kohya", family_name)

    assert any(step.exactness == "rounded" and "tucker" in step.name for step in first.steps), first.steps
    verified = loraformats.verify(source, result, family=family_name, tolerance=1e-6)
    assert verified.ok and verified.modules == len(reference_deltas(source, family_name))
    errors = relative_errors(reference_deltas(source, family_name), reference_deltas(result, family_name))
    assert not worst(errors, 1e-6)

    ours, _ = raw_file(source)
    theirs, their_metadata = raw_file(result)
    merged = {name.rsplit(".", 2)[0] for name in ours if name.endswith(".lora_mid.weight")}
    assert merged
    for name, tensor in ours.items():
        stem = name.split(".", 1)[0]
        if stem not in merged:
            assert theirs[name] == tensor, name
    for stem in merged:
        assert f"{stem}.lora_mid.weight" not in theirs
        down_dtype, down_shape, _ = theirs[f"{stem}.lora_down.weight"]
        assert down_dtype == "F32" and down_shape[2:] == ours[f"{stem}.lora_mid.weight"][1][2:]
    assert set(theirs) == set(ours) - {f"{stem}.lora_mid.weight" for stem in merged}
    kept = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    assert {k: their_metadata.get(k) for k in kept} == kept
    assert sd_scripts_hashes(load_file(result), their_metadata) == (
        their_metadata["sshs_model_hash"],
        their_metadata["sshs_legacy_hash"],
    )
