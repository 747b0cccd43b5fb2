"""sshs_model_hash / sshs_legacy_hash match sd-scripts' definition (serialise with safetensors, hash)."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save

from loraformats.tensors import MemoryTensor
from loraformats_kohya.hashes import SAFETENSORS_DTYPE_ORDER, safetensors_order, sshs_hashes


def reference_hashes(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes, restated: serialise in memory, then hash."""
    buffer = save(state, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_length = int.from_bytes(buffer[:8], "little")
    model = hashlib.sha256(buffer[8 + header_length :]).hexdigest()
    legacy = hashlib.sha256(buffer[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model, legacy


def as_memory(state):
    return [(name, MemoryTensor.from_torch(t)) for name, t in state.items()]


def test_dtype_order_matches_safetensors():
    state = {
        f"t_{name}": torch.zeros(2, dtype=dtype)
        for name, dtype in (
            ("F64", torch.float64),
            ("F32", torch.float32),
            ("F16", torch.float16),
            ("BF16", torch.bfloat16),
            ("I64", torch.int64),
            ("I32", torch.int32),
            ("I16", torch.int16),
            ("I8", torch.int8),
            ("U8", torch.uint8),
            ("BOOL", torch.bool),
        )
    }
    raw = save(state)
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    library_order = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    assert [name for name, _ in safetensors_order(as_memory(state))] == library_order
    assert set(SAFETENSORS_DTYPE_ORDER) >= {name[2:] for name in state}


def test_hashes_match_sd_scripts_definition_small_and_large():
    generator = torch.Generator().manual_seed(0)
    metadata = {"ss_network_dim": "4", "ss_tag_frequency": '{"a": {"b é": 1}}', "modelspec.title": "x"}
    for size in (16, 700_000):  # below and above the 1 MiB legacy window
        state = {
            "lora_unet_a.lora_down.weight": torch.randn(4, size // 4, generator=generator).half(),
            "lora_unet_a.lora_up.weight": torch.randn(size // 8, 4, generator=generator),
            "lora_unet_a.alpha": torch.tensor(1.0).half(),
            "lora_te_b.alpha": torch.tensor(2.0, dtype=torch.bfloat16),
        }
        assert sshs_hashes(as_memory(state), metadata) == reference_hashes(state, metadata)
